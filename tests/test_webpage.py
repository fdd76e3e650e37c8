"""The web page in a real browser: Debian Chromium driven by Playwright against the real app.

The app runs with the demo engine under uvicorn on a loopback port in a background thread, so
the page talks to it over real HTTP exactly as a user's browser would.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from foleyserve import Engine
from foleyserve.pipeline.demo import sample_clip_path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

if sync_playwright is None:
    pytestmark = pytest.mark.skip(reason="the playwright Python package is not installed (pip install playwright)")
elif shutil.which(CHROMIUM) is None:
    pytestmark = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
else:
    pytestmark = pytest.mark.slow

TIMEOUT_MS = 60_000  # generous: the CI machine has two cores shared with the model


def make_app(data_dir: Path, engine: Engine, **server_options):
    from foleyserve.server.app import create_app
    from foleyserve.server.settings import ServerConfig

    return create_app(ServerConfig(data_dir=str(data_dir), **server_options), engine=engine)


class LiveServer:
    """uvicorn on a socket bound up front, so no other process can take the port in between."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during startup; see the log above")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.url}/readyz did not answer 200 within {timeout} s (last: {last})")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(make_app(tmp_path_factory.mktemp("webpage-data"), engine))
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(make_app(tmp_path_factory.mktemp("webpage-key"), engine, api_key="s3cret-key"))
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Browser, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    return context, page


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context, page = open_page(browser, 1200, 900)
    yield page
    context.close()


@pytest.fixture()
def laptop(browser: Browser) -> Iterator[Page]:
    """A 1280x720 window: a laptop, where the form is taller than the screen."""
    context, page = open_page(browser, 1280, 720)
    yield page
    context.close()


def in_viewport(page: Page, selector: str) -> dict:
    """The element's box and whether all of it is inside the window, with nothing scrolled."""
    return page.evaluate(
        """(selector) => {
            const r = document.querySelector(selector).getBoundingClientRect();
            const inside = r.width > 0 && r.height > 0 && r.top >= 0 && r.left >= 0
                && r.bottom <= window.innerHeight && r.right <= window.innerWidth;
            return {inside, top: r.top, bottom: r.bottom, height: r.height, scrollY: window.scrollY,
                    innerHeight: window.innerHeight};
        }""",
        selector,
    )


def wait_for_server_limits(page: Page) -> None:
    page.wait_for_selector("body[data-limits=server]")


def set_client_id(page: Page, client_id: str) -> None:
    page.add_init_script(f"localStorage.setItem('foleyserve.clientId', {json.dumps(client_id)})")


def canvas_ink(page: Page, selector: str) -> float:
    """Fraction of the canvas's pixels that something was drawn on (alpha > 0)."""
    return page.evaluate(
        """(selector) => {
            const c = document.querySelector(selector);
            if (!c.width || !c.height) return 0;
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let ink = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
            return ink / (c.width * c.height);
        }""",
        selector,
    )


def test_generate_end_to_end(server: LiveServer, page: Page) -> None:
    page.goto(server.url + "/")
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    preview = page.locator("[data-testid=preview]")
    preview.wait_for(state="visible")
    assert (preview.get_attribute("src") or "").startswith("blob:")
    assert "sample" in page.locator("[data-testid=video-info]").inner_text()

    page.fill("[data-testid=prompt]", "footsteps on gravel")
    page.fill("[data-testid=steps]", "4")
    page.fill("[data-testid=seed]", "1234")
    # Record every status line and progress value the page shows while the job runs.
    page.evaluate(
        """() => {
            window.__seen = [];
            const bar = document.querySelector("[data-testid=progress-bar]");
            const status = document.querySelector("[data-testid=status]");
            const note = () => window.__seen.push([status.textContent, bar.getAttribute("value"), bar.max]);
            new MutationObserver(note).observe(status, {childList: true, characterData: true, subtree: true});
            new MutationObserver(note).observe(bar, {attributes: true});
        }"""
    )
    with page.expect_response(lambda r: r.request.method == "POST" and "/v1/generations" in r.url) as posted:
        page.click("[data-testid=generate]")
    assert posted.value.status == 202, posted.value.text()
    job_id = posted.value.json()["id"]

    page.wait_for_function(
        "document.querySelector('[data-testid=status]').textContent.startsWith('Done')", timeout=TIMEOUT_MS
    )
    bar = page.locator("[data-testid=progress-bar]")
    assert float(bar.get_attribute("max")) == 4.0  # the total came from the server's progress
    assert float(bar.get_attribute("value")) == 4.0
    assert page.locator("[data-testid=cancel]").is_hidden()
    seen = page.evaluate("window.__seen")
    assert seen and seen[-1][0].startswith("Done"), seen

    # The MP4 with the new sound loads and plays.
    video = page.locator("[data-testid=result-video]")
    video.wait_for(state="visible")
    assert (video.get_attribute("src") or "").startswith("blob:")
    played = page.evaluate(
        """async () => {
            const v = document.querySelector("[data-testid=result-video]");
            v.muted = true;  // autoplay policy: muted playback needs no user gesture
            await v.play();
            return {readyState: v.readyState, duration: v.duration, paused: v.paused};
        }"""
    )
    assert played["readyState"] >= 2 and played["duration"] > 3.0 and not played["paused"], played

    # The waveform was decoded from the downloaded audio and drawn: noise fills much of the canvas,
    # where silence would leave only the axis.
    page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
    assert canvas_ink(page, "[data-testid=waveform]") > 0.1
    meta = page.locator("[data-testid=result-meta]").inner_text()
    assert "1234" in meta and "footsteps on gravel" in meta
    assert "dBFS" in meta or "silent" in meta  # the decoded audio was measured

    main = page.locator("[data-testid=download-main]")
    assert main.is_visible() and (main.get_attribute("download") or "").endswith(".mp4")
    assert (main.get_attribute("href") or "").startswith("blob:")

    # The job is listed under Recent jobs as succeeded; clicking it shows it again.
    item = page.locator(f"[data-testid=recent-job][data-job-id='{job_id}']")
    item.wait_for(state="visible")
    page.wait_for_selector(f"[data-testid=recent-job][data-job-id='{job_id}'][data-status=succeeded]")
    assert "footsteps on gravel" in item.inner_text()
    assert item.get_attribute("aria-current") == "true"
    assert page.errors == []  # type: ignore[attr-defined]


def test_recent_job_shows_its_result(server: LiveServer, page: Page) -> None:
    # A job made through the API (not this page) with this browser's client id appears in the
    # list and opens on click.
    set_client_id(page, "recent-job-client")
    with open(sample_clip_path(), "rb") as f:
        r = httpx.post(
            f"{server.url}/v1/generations",
            files={"video": ("clip.mp4", f, "video/mp4")},
            data={"prompt": "rain on a tin roof", "steps": "2", "seed": "5", "output": "wav"},
            headers={"X-Client-Id": "recent-job-client"},
            timeout=30,
        )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/generations/{job_id}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the API job did not finish"
        time.sleep(0.2)

    page.goto(server.url + "/")
    item = page.locator(f"[data-testid=recent-job][data-job-id='{job_id}']")
    item.focus()
    page.keyboard.press("Enter")  # the list is keyboard-usable
    audio = page.locator("[data-testid=result-audio]")
    audio.wait_for(state="visible")
    assert page.locator("[data-testid=result-video]").is_hidden()
    page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
    assert canvas_ink(page, "[data-testid=waveform]") > 0.1
    assert (page.locator("[data-testid=download-main]").get_attribute("download") or "").endswith(".wav")
    assert "rain on a tin roof" in page.locator("[data-testid=result-meta]").inner_text()
    # Updating the list kept keyboard focus on the item the user picked.
    assert page.evaluate("document.activeElement.dataset.jobId") == job_id
    assert page.errors == []  # type: ignore[attr-defined]


def test_text_file_named_mp4_shows_the_servers_error(server: LiveServer, page: Page, tmp_path: Path) -> None:
    fake = tmp_path / "holiday.mp4"
    fake.write_text("these are my notes, not a video\n" * 20)
    # What the server itself says about this upload; the page must show that message.
    r = httpx.post(f"{server.url}/v1/generations", files={"video": ("holiday.mp4", fake.read_bytes(), "video/mp4")})
    assert 400 <= r.status_code < 500, r.text
    expected = r.json()["error"]

    page.goto(server.url + "/")
    page.set_input_files("[data-testid=video-input]", str(fake))
    page.fill("[data-testid=steps]", "4")
    page.click("[data-testid=generate]")
    alert = page.locator("[data-testid=alert]")
    alert.wait_for(state="visible")
    assert expected["message"] in alert.inner_text()
    assert alert.get_attribute("data-code") == expected["code"]
    assert page.locator("[data-testid=result]").is_hidden()
    assert page.locator("[data-testid=generate]").is_enabled()  # the user can pick another file and retry


def test_generate_without_video_names_the_problem(server: LiveServer, page: Page) -> None:
    page.goto(server.url + "/")
    page.focus("[data-testid=generate]")
    page.keyboard.press("Enter")
    alert = page.locator("[data-testid=alert]")
    alert.wait_for(state="visible")
    assert "No video chosen" in alert.inner_text()
    # Out-of-range steps are caught in the page, naming the field.
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.fill("[data-testid=steps]", "0")
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Steps')")


def test_drop_a_video_onto_the_drop_zone(server: LiveServer, page: Page) -> None:
    page.goto(server.url + "/")
    clip = base64.b64encode(Path(sample_clip_path()).read_bytes()).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.mp4", {type: "video/mp4"}));
            const zone = document.querySelector("[data-testid=dropzone]");
            zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        clip,
    )
    page.locator("[data-testid=preview]").wait_for(state="visible")
    page.wait_for_function("document.querySelector('[data-testid=preview]').readyState >= 1")
    assert "dropped.mp4" in page.locator("[data-testid=video-info]").inner_text()
    assert page.evaluate("document.querySelector('[data-testid=video-input]').files[0].name") == "dropped.mp4"
    assert "dragging" not in (page.locator("[data-testid=dropzone]").get_attribute("class") or "")


def test_cancel_a_running_job(server: LiveServer, page: Page) -> None:
    page.goto(server.url + "/")
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.fill("[data-testid=steps]", "1000")
    page.click("[data-testid=generate]")
    cancel = page.locator("[data-testid=cancel]")
    cancel.wait_for(state="visible")
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Generating')")
    cancel.click()
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent === 'Cancelled'")
    assert page.locator("[data-testid=result]").is_hidden()
    assert page.locator("[data-testid=alert]").is_hidden()


def test_api_key_prompt(keyed_server: LiveServer, page: Page) -> None:
    page.goto(keyed_server.url + "/")
    # Loading the recent-jobs list answers 401, so the page asks for the key.
    key_form = page.locator("[data-testid=apikey-form]")
    key_form.wait_for(state="visible")
    assert "API key" in page.locator("[data-testid=alert]").inner_text()

    page.fill("[data-testid=apikey-input]", "wrong")
    page.click("[data-testid=apikey-save]")
    key_form.wait_for(state="visible")  # refused again: asked again
    assert "did not accept" in page.locator("[data-testid=alert]").inner_text()

    page.fill("[data-testid=apikey-input]", "s3cret-key")
    page.press("[data-testid=apikey-input]", "Enter")
    page.locator("[data-testid=recent-empty]").wait_for(state="visible")
    assert key_form.is_hidden() and page.locator("[data-testid=alert]").is_hidden()
    assert page.evaluate("sessionStorage.getItem('foleyserve.apiKey')") == "s3cret-key"

    # With the key, an upload goes through and the job is followed to the end.
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.fill("[data-testid=steps]", "2")
    page.select_option("[data-testid=output]", "flac")
    with page.expect_response(lambda r: r.request.method == "POST" and "/v1/generations" in r.url) as posted:
        page.click("[data-testid=generate]")
    job_id = posted.value.json()["id"]
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Done')")
    page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
    assert page.locator("[data-testid=result-audio]").is_visible()
    # The download is named after what the server actually sent.
    auth = {"Authorization": "Bearer s3cret-key"}
    job = httpx.get(f"{keyed_server.url}/v1/generations/{job_id}", headers=auth).json()
    served = httpx.get(keyed_server.url + job["audio_url"], headers=auth).headers["content-type"]
    suffix = ".flac" if "flac" in served else ".wav"
    assert (page.locator("[data-testid=download-main]").get_attribute("download") or "").endswith(suffix)
    # The only console errors are the browser's own notes about the refused (401) requests.
    assert [e for e in page.errors if "status of 401" not in e] == []  # type: ignore[attr-defined]


# -- a 1280x720 window ----------------------------------------------------------------------------


def test_laptop_button_error_and_progress_in_view(server: LiveServer, laptop: Page, tmp_path: Path) -> None:
    page = laptop
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    box = in_viewport(page, "[data-testid=generate]")
    assert box["inside"] and box["scrollY"] == 0, box

    # A file the server refuses: its message shows beside the button, with nothing scrolled.
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n" * 50)
    page.set_input_files("[data-testid=video-input]", str(fake))
    page.click("[data-testid=generate]")
    page.locator("[data-testid=alert]").wait_for(state="visible")
    for selector in ("[data-testid=alert-message]", "[data-testid=generate]"):
        box = in_viewport(page, selector)
        assert box["inside"] and box["scrollY"] == 0, (selector, box)

    # With a real clip the preview makes the form taller than the window; the button, the
    # status and the progress bar stay in view all the same. (Steps first: filling a field
    # below the fold would make Playwright scroll.)
    page.fill("[data-testid=steps]", "2")
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.wait_for_function("document.querySelector('[data-testid=preview]').readyState >= 1")
    page.evaluate("window.scrollTo(0, 0)")
    form_bottom = page.evaluate("document.querySelector('[data-testid=generate-form]').getBoundingClientRect().bottom")
    assert form_bottom > 720, "the form fits the window, so this case checks nothing"
    assert in_viewport(page, "[data-testid=generate]")["inside"]
    page.click("[data-testid=generate]")
    page.locator("[data-testid=progress-panel]").wait_for(state="visible")
    for selector in ("[data-testid=status]", "[data-testid=progress-bar]", "[data-testid=generate]"):
        box = in_viewport(page, selector)
        assert box["inside"] and box["scrollY"] == 0, (selector, box)
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Done')")
    assert in_viewport(page, "[data-testid=status]")["inside"]
    # The only console error is the browser's own note about the refused (415) upload.
    assert [e for e in page.errors if "status of 415" not in e] == []  # type: ignore[attr-defined]


# -- stubbed API answers --------------------------------------------------------------------------

FAKE_ID = "f" * 32


def stub_sample_job(page: Page, job: dict) -> list[str]:
    """Answer the page's API calls with ``job`` (a finished multi-sample job whose sample audio is
    a tone per seed); returns the bodies the page POSTs."""
    posted: list[str] = []

    def generations(route) -> None:
        request = route.request
        if request.method == "POST":
            posted.append(request.post_data or "")
            route.fulfill(status=202, content_type="application/json", body=json.dumps({"id": FAKE_ID, "status": "queued"}))
        elif "/audio" in request.url:
            seed = int(request.url.rsplit("seed=", 1)[1])
            route.fulfill(content_type="audio/wav", body=tone_wav(200 + 100 * (seed - 40)))
        elif request.url.endswith(FAKE_ID):
            route.fulfill(content_type="application/json", body=json.dumps(job))
        else:
            route.fulfill(content_type="application/json", body=json.dumps({"items": []}))

    page.route("**/v1/generations**", generations)
    return posted


def test_preparing_status_is_named(server: LiveServer, laptop: Page) -> None:
    # The encoders' stage is too short to catch on a real server, so the API answers are stubbed.
    page = laptop
    seen_ids: list[str | None] = []

    def generations(route) -> None:
        request = route.request
        seen_ids.append(request.headers.get("x-client-id"))
        if request.method == "POST":
            body = {"id": FAKE_ID, "status": "queued", "cache_hit": False}
            route.fulfill(status=202, content_type="application/json", body=json.dumps(body))
        elif request.url.endswith(FAKE_ID):
            body = {"id": FAKE_ID, "status": "preparing", "progress": {"step": 0, "total": 0}, "prompt": "rain"}
            route.fulfill(content_type="application/json", body=json.dumps(body))
        else:
            route.fulfill(content_type="application/json", body=json.dumps({"items": []}))

    page.route("**/v1/generations**", generations)
    page.goto(server.url + "/")
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.click("[data-testid=generate]")
    status = page.locator("[data-testid=status]")
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Preparing')")
    assert status.inner_text() == "Preparing: reading the video and prompt…"
    assert page.locator("[data-testid=progress-bar]").get_attribute("value") is None  # indeterminate
    assert page.locator("[data-testid=cancel]").is_visible()
    assert in_viewport(page, "[data-testid=status]")["inside"]
    # Every call (list, submit, poll) carried the same client id.
    assert len(seen_ids) >= 3 and len(set(seen_ids)) == 1 and seen_ids[0], seen_ids


def stub_info(page: Page, **changes) -> None:
    """Answer /v1/info like an edge-profile server, with ``changes`` merged in."""
    info = {
        "ready": True,
        "engine": {"model": "xl", "precision": "fp8-weight-only", "device": "cuda:0"},
        "limits": {"max_upload_bytes": 100 * 2**20, "max_prompt_chars": 500, "steps": [1, 50], "guidance": [0, 10],
                   "seed": [0, 2**63 - 1], "outputs": ["wav", "flac"], "max_video_seconds": 8},
        "defaults": {"steps": 25, "guidance": 3.5, "negative_prompt": "hiss", "output": "flac"},
        "auth": False,
        "demo": False,
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            info[key] = {**info[key], **value}
        else:
            info[key] = value
    page.route("**/v1/info", lambda route: route.fulfill(content_type="application/json", body=json.dumps(info)))


def test_fields_follow_the_servers_limits(server: LiveServer, laptop: Page, tmp_path: Path) -> None:
    page = laptop
    stub_info(page)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    steps = page.locator("[data-testid=steps]")
    assert steps.get_attribute("max") == "50" and steps.input_value() == "25"
    assert "1–50" in page.locator("[data-testid=steps-hint]").inner_text()
    guidance = page.locator("[data-testid=guidance]")
    assert guidance.get_attribute("max") == "10" and guidance.input_value() == "3.5"
    output = page.locator("[data-testid=output]")
    assert output.locator("option").evaluate_all("os => os.map(o => o.value)") == ["wav", "flac"]
    assert output.input_value() == "flac"
    assert page.locator("[data-testid=negative-prompt]").input_value() == "hiss"
    assert page.locator("[data-testid=prompt]").get_attribute("maxlength") == "500"
    assert "8" in page.locator("[data-testid=video-limits]").inner_text()
    assert page.locator("[data-testid=demo-banner]").is_hidden()

    # Over the server's step limit: refused in the page, naming the field; nothing is sent.
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.fill("[data-testid=steps]", "51")
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Steps')")
    assert in_viewport(page, "[data-testid=alert-message]")["inside"]
    assert posts == []


def test_too_large_video_is_refused_before_upload(server: LiveServer, page: Page) -> None:
    stub_info(page, limits={"max_upload_bytes": 4096})
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    page.locator("[data-testid=alert]").wait_for(state="visible")
    assert page.locator("[data-testid=alert]").get_attribute("data-code") == "payload_too_large"
    assert "4.0 kB" in page.locator("[data-testid=alert-message]").inner_text()
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('No video')")
    assert posts == []


def test_defaults_wait_for_the_server(server: LiveServer, page: Page) -> None:
    # A press before /v1/info has answered still obeys the server's limits, and a value the user
    # typed is not overwritten by the server's default.
    release: list = []
    page.route("**/v1/info", lambda route: release.append(route))
    page.goto(server.url + "/")
    page.fill("[data-testid=steps]", "60")
    page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.click("[data-testid=generate]")
    page.wait_for_function("() => true")
    assert release, "the page did not ask for /v1/info"
    info = {"ready": True, "limits": {"steps": [1, 50]}, "defaults": {"steps": 25}, "demo": False}
    release[0].fulfill(content_type="application/json", body=json.dumps(info))
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Steps')")
    assert page.locator("[data-testid=steps]").input_value() == "60"
    assert posts == []


def test_demo_banner_and_labels(server: LiveServer, laptop: Page) -> None:
    page = laptop
    page.goto(server.url + "/")
    banner = page.locator("[data-testid=demo-banner]")
    banner.wait_for(state="visible")  # the test server runs the random-weight demo model
    assert "noise" in banner.inner_text() and "random" in banner.inner_text()
    assert in_viewport(page, "[data-testid=generate]")["inside"]  # the banner does not push it out
    # The official spec's labels, tied to their fields.
    assert page.get_by_label("Video Input").get_attribute("data-testid") == "video-input"
    assert page.get_by_label("Audio Description").get_attribute("data-testid") == "prompt"


def test_demo_banner_hidden_for_a_real_model(server: LiveServer, page: Page) -> None:
    stub_info(page)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    assert page.locator("[data-testid=demo-banner]").is_hidden()


# -- this browser's jobs ---------------------------------------------------------------------------


def test_client_id_is_stable_and_sent(server: LiveServer, page: Page) -> None:
    ids: list[str | None] = []
    page.on("request", lambda r: ids.append(r.headers.get("x-client-id")) if "/v1/" in r.url else None)
    page.goto(server.url + "/")
    page.locator("[data-testid=recent-empty], [data-testid=recent-job]").first.wait_for(state="attached")
    page.wait_for_function("document.body.dataset.limits === 'server'")
    stored = page.evaluate("localStorage.getItem('foleyserve.clientId')")
    assert stored and len(stored) >= 16
    page.reload()
    page.wait_for_function("document.body.dataset.limits === 'server'")
    assert page.evaluate("localStorage.getItem('foleyserve.clientId')") == stored
    assert ids and set(ids) == {stored}, ids


# The server records the X-Client-Id a job was sent with and GET /v1/generations lists only the
# caller's jobs; two browsers with their own ids each see their own.
def test_recent_jobs_are_only_this_browsers(server: LiveServer, browser: Browser) -> None:
    with open(sample_clip_path(), "rb") as f:
        clip = f.read()
    mine = httpx.post(f"{server.url}/v1/generations", files={"video": ("a.mp4", clip, "video/mp4")},
                      data={"prompt": "mine", "steps": "1", "output": "wav"}, headers={"X-Client-Id": "browser-a-0001"},
                      timeout=30)
    theirs = httpx.post(f"{server.url}/v1/generations", files={"video": ("b.mp4", clip, "video/mp4")},
                        data={"prompt": "theirs", "steps": "1", "output": "wav"}, headers={"X-Client-Id": "browser-b-0002"},
                        timeout=30)
    assert mine.status_code == 202 and theirs.status_code == 202, (mine.text, theirs.text)
    for client, shown, hidden in (("browser-a-0001", mine, theirs), ("browser-b-0002", theirs, mine)):
        context, page = open_page(browser, 1280, 720)
        try:
            set_client_id(page, client)
            page.goto(server.url + "/")
            page.locator(f"[data-testid=recent-job][data-job-id='{shown.json()['id']}']").wait_for(state="visible")
            assert page.locator(f"[data-testid=recent-job][data-job-id='{hidden.json()['id']}']").count() == 0
        finally:
            context.close()


def test_info_asked_again_while_the_model_loads(server: LiveServer, page: Page) -> None:
    # Only a loaded server knows whether it runs the demo model, so the page asks again.
    answers = [
        {"ready": False, "engine": None, "limits": {"steps": [1, 50]}, "defaults": {"steps": 25}, "demo": False},
        {"ready": True, "engine": {"model": "demo (random weights)"}, "limits": {"steps": [1, 50]}, "defaults": {"steps": 25}},
    ]
    asked: list[int] = []

    def info(route) -> None:
        asked.append(1)
        body = answers[min(len(asked), len(answers)) - 1]
        route.fulfill(content_type="application/json", body=json.dumps(body))

    page.route("**/v1/info", info)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    assert page.locator("[data-testid=demo-banner]").is_hidden()
    # No demo flag in the second answer: the model's name tells.
    page.locator("[data-testid=demo-banner]").wait_for(state="visible", timeout=15_000)
    assert len(asked) == 2


# -- text to audio and several samples ---------------------------------------------------------------


def test_text_only_mode_submits_without_a_video(server: LiveServer, laptop: Page) -> None:
    page = laptop
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    output = page.locator("[data-testid=output]")
    assert "mp4" in output.locator("option").evaluate_all("os => os.map(o => o.value)")
    page.check("[data-testid=mode-text]")
    assert page.locator("[data-testid=video-field]").is_hidden()
    duration = page.locator("[data-testid=duration]")
    assert duration.is_visible()
    assert (duration.get_attribute("min"), duration.get_attribute("max")) == ("0.64", "15")
    assert output.locator("option").evaluate_all("os => os.map(o => o.value)") == ["wav", "flac"]
    assert output.input_value() == "wav"
    assert in_viewport(page, "[data-testid=generate]")["inside"]

    # Out of range: refused in the page, naming the field.
    page.fill("[data-testid=duration]", "20")
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Duration')")

    page.fill("[data-testid=duration]", "1.5")
    page.fill("[data-testid=prompt]", "distant thunder")
    page.fill("[data-testid=steps]", "2")
    with page.expect_response(lambda r: r.request.method == "POST" and "/v1/generations" in r.url) as posted:
        page.click("[data-testid=generate]")
    assert posted.value.status == 202, posted.value.text()
    sent = posted.value.request.post_data or ""
    assert 'name="duration"' in sent and 'name="video"' not in sent and 'name="num_samples"' not in sent
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Done')")
    assert in_viewport(page, "[data-testid=status]")["inside"]
    page.locator("[data-testid=result-audio]").wait_for(state="visible")
    assert page.locator("[data-testid=result-video]").is_hidden()
    page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
    assert "text only" in page.locator("[data-testid=result-meta]").inner_text()
    assert page.locator("[data-testid=samples]").is_hidden()  # one sample: no list

    # Back to a video: the picker and the mp4 choice return.
    page.check("[data-testid=mode-video]")
    assert page.locator("[data-testid=video-field]").is_visible() and page.locator("[data-testid=duration-field]").is_hidden()
    assert "mp4" in output.locator("option").evaluate_all("os => os.map(o => o.value)")
    assert page.errors == []  # type: ignore[attr-defined]


def tone_wav(freq: float, seconds: float = 0.5, rate: int = 48000) -> bytes:
    import io
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n)))
    return buf.getvalue()


def test_several_samples_are_listed_and_one_can_be_picked(server: LiveServer, laptop: Page) -> None:
    page = laptop
    seeds = [40, 41, 42]
    base = f"/v1/generations/{FAKE_ID}"
    results = [{"seed": s, "audio_url": f"{base}/audio?seed={s}", "video_url": None} for s in seeds]
    job = {
        "id": FAKE_ID, "status": "succeeded", "progress": {"step": 2, "total": 2}, "prompt": "rain", "seed": 40,
        "output": "wav", "cache_hit": False, "timings": {}, "warnings": [], "num_samples": 3, "text_only": True,
        "audio_url": results[0]["audio_url"], "video_url": None, "results": results, "expired": False,
    }
    posted = stub_sample_job(page, job)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    samples_input = page.locator("[data-testid=num-samples]")
    assert (samples_input.get_attribute("min"), samples_input.get_attribute("max")) == ("1", "8")
    page.check("[data-testid=mode-text]")
    page.fill("[data-testid=seed]", "40")
    page.fill("[data-testid=num-samples]", "9")  # over the server's limit: refused in the page
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Samples')")
    assert posted == []
    page.fill("[data-testid=num-samples]", "3")
    page.click("[data-testid=generate]")
    page.wait_for_selector("[data-testid=sample] >> nth=2")
    assert 'name="num_samples"\r\n\r\n3' in posted[0]

    items = page.locator("[data-testid=sample]")
    assert items.count() == 3
    assert [items.nth(k).get_attribute("data-seed") for k in range(3)] == ["40", "41", "42"]
    for k, seed in enumerate(seeds):
        item = items.nth(k)
        assert f"Seed {seed}" in item.inner_text()
        assert (item.locator("[data-testid=sample-audio]").get_attribute("src") or "").startswith("blob:")
        link = item.locator("[data-testid=sample-download]")
        assert (link.get_attribute("href") or "").startswith("blob:") and f"seed{seed}" in (link.get_attribute("download") or "")
    assert items.nth(0).get_attribute("data-picked") == "true"
    meta = page.locator("[data-testid=result-meta]")
    assert "40" in meta.inner_text()

    # Picking the second highlights it and makes it the result shown above.
    items.nth(1).locator("[data-testid=sample-pick]").click()
    assert items.nth(1).get_attribute("data-picked") == "true" and items.nth(0).get_attribute("data-picked") == "false"
    assert items.nth(1).locator("[data-testid=sample-pick]").get_attribute("aria-pressed") == "true"
    page.wait_for_function("document.querySelector('[data-testid=download-main]').download.includes('seed41')")
    page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
    assert "41" in meta.inner_text()
    page.click("[data-testid=reuse-seed]")
    assert page.locator("[data-testid=seed]").input_value() == "41"
    assert in_viewport(page, "[data-testid=generate]")["inside"]
    assert page.errors == []  # type: ignore[attr-defined]
