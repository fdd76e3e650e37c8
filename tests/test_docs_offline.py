"""/docs and /redoc load everything from the server itself, so they work with no internet access.

The browser cases block every request that does not go to the test server, as a machine without
internet access would, and check that the pages still render. The HTTP cases need no browser.
"""

from __future__ import annotations

import logging

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from foleyserve.server import docs

# The browser machinery is the web page's; importing its fixtures makes them usable here.
from test_webpage import CHROMIUM, TIMEOUT_MS, LiveServer, browser, engine, make_app, sync_playwright  # noqa: F401

STATIC = Path(docs.__file__).resolve().parent / "static"
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
EXTERNAL = re.compile(r"""(?:src|href)=["']?(?:https?:)?//""", re.I)


def wired(app: FastAPI) -> bool:
    """Whether create_app itself serves /docs through mount_docs."""
    return any(getattr(r, "path", None) == "/docs" and getattr(r, "endpoint", None).__module__ == docs.__name__
               for r in app.routes)


def small_app(**fastapi_options) -> FastAPI:
    app = FastAPI(title="docs-test", version="9.9", **fastapi_options)

    @app.post("/v1/generations")
    def generate() -> dict[str, str]:
        return {}

    docs.mount_docs(app)
    return app


# -- no browser ------------------------------------------------------------------------------------


def test_pages_reference_only_local_files() -> None:
    client = TestClient(small_app(docs_url=None, redoc_url=None))
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200, page
        assert not EXTERNAL.search(r.text), f"{page} loads something from another host:\n{r.text}"
        assets = re.findall(r"""(?:src|href)=["']?(/static/docs/[^"'\s>]+)""", r.text)
        assert assets, r.text
        for url in assets:
            got = client.get(url)
            assert got.status_code == 200 and len(got.content) > 100, url
    assert "window.opener" in client.get("/docs/oauth2-redirect").text


def test_fastapi_cdn_pages_are_replaced() -> None:
    # Built with FastAPI's defaults, the CDN routes exist first; mount_docs must take their place.
    client = TestClient(small_app())
    for page in ("/docs", "/redoc"):
        text = client.get(page).text
        assert "cdn.jsdelivr" not in text and "/static/docs/" in text


def test_root_path_prefixes_every_url() -> None:
    client = TestClient(small_app(docs_url=None, redoc_url=None), root_path="/foley")
    text = client.get("/docs").text
    assert "'/foley/openapi.json'" in text and "/foley/static/docs/swagger-ui/swagger-ui-bundle.js" in text
    assert "/foley/static/docs/redoc/redoc.standalone.js" in client.get("/redoc").text


def test_missing_assets_fall_back_to_the_cdn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    # At WARNING explicitly: an in-process CLI test may have quieted the "foleyserve" logger.
    with caplog.at_level(logging.WARNING, logger="foleyserve.server"):
        docs.mount_docs(app, assets_dir=tmp_path)
    assert "swagger-ui-bundle.js" in TestClient(app).get("/docs").text
    assert "assets are missing" in caplog.text


def test_vendored_files_match_their_readme() -> None:
    readme = (STATIC / "docs" / "README.md").read_text()
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    assert {name for _, name in listed} >= set(docs.ASSETS)
    for digest, name in listed:
        assert hashlib.sha256((STATIC / "docs" / name).read_bytes()).hexdigest() == digest, name
    for licence in ("swagger-ui/LICENSE", "swagger-ui/NOTICE", "redoc/LICENSE"):
        assert (STATIC / "docs" / licence).is_file()


def test_package_data_ships_the_docs_assets() -> None:
    """Every file under server/static/ must match a package-data glob, or the wheel lacks it."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["foleyserve"]
    package = STATIC.parents[1]
    missing = [
        str(f.relative_to(package)) for f in STATIC.rglob("*")
        if f.is_file() and not any(_glob_matches(f.relative_to(package).as_posix(), g) for g in globs)
    ]
    assert not missing, f"pyproject's package-data does not ship {missing}; add a glob such as 'server/static/**/*'"


def _glob_matches(path: str, pattern: str) -> bool:
    # setuptools' package-data globs: '*' stays inside one folder, '**' crosses folders.
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return re.fullmatch(regex, path) is not None


def test_create_app_serves_offline_docs(tmp_path: Path, engine) -> None:  # noqa: F811
    app = make_app(tmp_path, engine)
    assert wired(app), "create_app must call mount_docs (and build FastAPI with docs_url=None, redoc_url=None)"
    client = TestClient(app)
    assert "/static/docs/swagger-ui/swagger-ui-bundle.js" in client.get("/docs").text
    assert "/static/docs/redoc/redoc.standalone.js" in client.get("/redoc").text


# -- in a browser, offline -------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not Path(CHROMIUM).exists(), reason="needs the playwright package and Debian's Chromium"
)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    live = LiveServer(make_app(tmp_path_factory.mktemp("docs-data"), engine, api_key="docs-stay-public"))
    live.start()
    yield live
    live.stop()


@pytest.fixture()
def offline_page(browser, server: LiveServer):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    blocked: list[str] = []

    def only_loopback(route) -> None:
        url = route.request.url
        if url.startswith(server.url + "/") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.blocked = blocked  # type: ignore[attr-defined]
    yield page
    context.close()


@needs_browser
@pytest.mark.slow
def test_swagger_ui_renders_offline(server: LiveServer, offline_page) -> None:
    page = offline_page
    response = page.goto(server.url + "/docs")
    assert response is not None and response.status == 200  # public although the API has a key
    post = page.locator(".opblock-post .opblock-summary").filter(
        has=page.locator(".opblock-summary-path[data-path='/v1/generations']")
    )
    post.first.wait_for(state="visible")
    summary = post.first.inner_text()
    assert "POST" in summary and "/v1/generations" in summary
    assert page.blocked == [], page.blocked  # type: ignore[attr-defined]


@needs_browser
@pytest.mark.slow
def test_redoc_renders_offline(server: LiveServer, offline_page) -> None:
    page = offline_page
    response = page.goto(server.url + "/redoc")
    assert response is not None and response.status == 200
    title = page.locator("h1", has_text="foleyserve")
    title.first.wait_for(state="visible")
    # The operation list rendered too, not only the heading.
    page.locator("h2", has_text="Generate Foley for a video").first.wait_for(state="visible")
    # ReDoc 2 always tries Redocly's logo in its menu footer; offline the image removes itself,
    # so that one request is the only one allowed to fail.
    assert set(page.blocked) <= {REDOCLY_LOGO}, page.blocked  # type: ignore[attr-defined]
    page.wait_for_function("!document.querySelector('img[alt=\"redocly logo\"]')")
