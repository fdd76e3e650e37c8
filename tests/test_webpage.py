"""The web page in a real browser: Debian Chromium driven by Playwright against the real app.

The app runs with the demo engine under uvicorn on a loopback port in a background thread, so
the page talks to it over real HTTP exactly as a user's browser would.
"""

from __future__ import annotations

import base64
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


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()


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
    # A job made through the API (not this page) appears in the list and opens on click.
    with open(sample_clip_path(), "rb") as f:
        r = httpx.post(
            f"{server.url}/v1/generations",
            files={"video": ("clip.mp4", f, "video/mp4")},
            data={"prompt": "rain on a tin roof", "steps": "2", "seed": "5", "output": "wav"},
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
