"""The API documentation pages, /docs (Swagger UI) and /redoc (ReDoc), served without a CDN.

FastAPI's built-in pages load their JavaScript and CSS from a CDN, so on a machine without internet
access they stay blank. Here the same pages load files vendored under ``static/docs/`` (see the
README there for versions, licences and hashes)::

    app = FastAPI(..., docs_url=None, redoc_url=None)
    mount_docs(app)

The pages are public, like FastAPI's own: they hold nothing but the OpenAPI schema, which is public
too, and a browser cannot send an API key when it follows a link to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.routing import Mount, Route

log = logging.getLogger("foleyserve.server")

DOCS_ASSETS = Path(__file__).resolve().parent / "static" / "docs"
SWAGGER_JS = "swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui/swagger-ui.css"
FAVICON = "swagger-ui/favicon-32x32.png"
REDOC_JS = "redoc/redoc.standalone.js"
ASSETS = (SWAGGER_JS, SWAGGER_CSS, FAVICON, REDOC_JS)


def assets_present(directory: Path = DOCS_ASSETS) -> bool:
    return all((directory / name).is_file() for name in ASSETS)


def mount_docs(
    app: FastAPI,
    static_url: str = "/static/docs",
    *,
    docs_url: str | None = "/docs",
    redoc_url: str | None = "/redoc",
    assets_dir: Path = DOCS_ASSETS,
) -> None:
    """Add ``docs_url``, its OAuth2 redirect page and ``redoc_url``, loading their scripts from
    ``static_url``, where the vendored files are mounted.

    Build the app with ``docs_url=None, redoc_url=None``. Routes FastAPI already added at these
    paths are replaced all the same, since the first matching route wins and FastAPI's would keep
    loading from the CDN.
    """
    openapi_url = app.openapi_url
    if openapi_url is None:
        return  # no schema, so nothing to document (FastAPI skips its pages too)
    static_url = "/" + static_url.strip("/")
    redirect_url = app.swagger_ui_oauth2_redirect_url if docs_url else None
    local = assets_present(assets_dir)
    if not local:
        # A wheel built without the static/docs package data: online the CDN pages still work,
        # which beats refusing to start over documentation.
        log.warning("the API docs' assets are missing from %s; /docs and /redoc will load them from a CDN", assets_dir)

    ours = {url for url in (docs_url, redirect_url, redoc_url) if url}
    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, Route) and r.path in ours)]

    if local and not any(isinstance(r, Mount) and r.path == static_url for r in app.router.routes):
        from fastapi.staticfiles import StaticFiles

        app.mount(static_url, StaticFiles(directory=assets_dir), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        return f"{_root(request)}{static_url}/{name}"

    if docs_url:
        # Swagger UI would otherwise post the schema to validator.swagger.io for its badge.
        parameters = {"validatorUrl": None, **(app.swagger_ui_parameters or {})}

        async def swagger_ui(request: Request) -> HTMLResponse:
            root = _root(request)
            urls = {}
            if local:
                urls = {
                    "swagger_js_url": asset(request, SWAGGER_JS),
                    "swagger_css_url": asset(request, SWAGGER_CSS),
                    "swagger_favicon_url": asset(request, FAVICON),
                }
            return get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=root + redirect_url if redirect_url else None,
                init_oauth=app.swagger_ui_init_oauth,
                swagger_ui_parameters=parameters,
                **urls,
            )

        app.add_route(docs_url, swagger_ui, include_in_schema=False)

        if redirect_url:

            async def oauth2_redirect(_request: Request) -> HTMLResponse:
                return get_swagger_ui_oauth2_redirect_html()

            app.add_route(redirect_url, oauth2_redirect, include_in_schema=False)

    if redoc_url:

        async def redoc(request: Request) -> HTMLResponse:
            urls = {}
            if local:
                urls = {"redoc_js_url": asset(request, REDOC_JS), "redoc_favicon_url": asset(request, FAVICON)}
            return get_redoc_html(
                openapi_url=_root(request) + openapi_url,
                title=f"{app.title} - ReDoc",
                # Google Fonts is one more CDN; ReDoc falls back to the system's fonts.
                with_google_fonts=not local,
                **urls,
            )

        app.add_route(redoc_url, redoc, include_in_schema=False)


def _root(request: Request) -> str:
    """The sub-path a proxy serves the app under (FastAPI's pages prefix their URLs with it too)."""
    return str(request.scope.get("root_path", "")).rstrip("/")
