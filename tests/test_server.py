"""The HTTP service against the real batcher, cache and demo engine (FastAPI TestClient, in process).

Clips are made here with PyAV: 1.2 s at 64x48, so a 2-step job takes a fraction of a second on two
cores. Long-running jobs (1000 steps) exist only to be cancelled; every test cancels what it starts
so that no batch outlives its app.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from foleyserve import Engine, media
from foleyserve.config import EngineConfig
from foleyserve.server import app as server_app
from foleyserve.server import service as server_service
from foleyserve.server.app import create_app
from foleyserve.server.jobs import JobRecord, JobStore
from foleyserve.server.settings import ServerConfig

LONG = "1000"  # steps: a job that runs until cancelled
DEADLINE_S = 60.0


# ------------------------------------------------------------------------------------ helpers


def make_clip(seconds: float = 1.2, *, size: tuple[int, int] = (64, 48), fps: int = 25) -> bytes:
    """H.264 MP4 of changing grey levels."""
    buf = io.BytesIO()
    w, h = size
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(round(seconds * fps)):
            img = np.full((h, w, 3), (i * 17) % 256, np.uint8)
            img[: h // 2, : w // 2] = 255 - img[0, 0]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_clip(1.2)


@pytest.fixture()
def serve(engine: Engine, tmp_path: Path):
    """serve(**server options) -> a started TestClient; the app is shut down at the end of the test."""
    stack: list = []

    def start(data_dir: Path | None = None, **options) -> TestClient:
        config = ServerConfig(data_dir=data_dir or tmp_path / "data", **{"cache": "memory", **options})
        client = TestClient(create_app(config, engine=engine), raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        return client

    yield start
    for client in reversed(stack):
        client.__exit__(None, None, None)


def submit(client: TestClient, video: bytes, *, name: str = "clip.mp4", wait: float = 0, **fields) -> dict:
    data = {"steps": "2", **{k: str(v) for k, v in fields.items()}}
    url = "/v1/generations" + (f"?wait={wait}" if wait else "")
    r = client.post(url, files={"video": (name, video, "video/mp4")}, data=data)
    assert r.status_code in (200, 202), r.text
    return r.json()


def wait_for(client: TestClient, job_id: str, pred, what: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        body = client.get(f"/v1/generations/{job_id}").json()
        if pred(body):
            return body
        assert time.monotonic() < deadline, f"job {job_id} never got {what}: {body}"
        time.sleep(0.02)


def finished(client: TestClient, job_id: str) -> dict:
    return wait_for(client, job_id, lambda b: b["status"] in ("succeeded", "failed", "cancelled"), "a final status")


def denoising(client: TestClient, job_id: str) -> dict:
    return wait_for(client, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] > 0, "to denoising")


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    assert "Traceback" not in r.text
    return body["error"]


def open_media(data: bytes) -> av.container.InputContainer:
    return av.open(io.BytesIO(data))


# ----------------------------------------------------------------------------- happy paths


def test_generate_mp4_with_wait_then_download_both_files(serve, clip: bytes) -> None:
    c = serve()
    r = c.post("/v1/generations?wait=60", files={"video": ("clip.mp4", clip, "video/mp4")},
               data={"prompt": "rain on a roof", "steps": "3", "seed": "7"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["error"] is None and job["cache_hit"] is False
    assert job["progress"] == {"step": 3, "total": 3}
    assert job["prompt"] == "rain on a roof" and job["seed"] == 7 and job["steps"] == 3 and job["output"] == "mp4"
    assert {"decode", "dit", "dac"} <= set(job["timings"]) and job["duration"] > 1.0
    assert r.headers["location"] == f"/v1/generations/{job['id']}"
    assert job["finished"] >= job["started"] >= job["created"]

    audio = c.get(job["audio_url"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    with open_media(audio.content) as a:
        stream = a.streams.audio[0]
        assert a.format.name == "wav" and stream.rate == 48000
        samples = np.concatenate([f.to_ndarray().ravel() for f in a.decode(stream)])
    assert abs(len(samples) / 48000 - job["duration"]) < 0.01 and np.abs(samples).max() > 0

    video = c.get(job["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    with open_media(video.content) as v:
        assert v.streams.video and v.streams.audio and v.streams.audio[0].rate == 48000

    again = c.get(f"/v1/generations/{job['id']}").json()
    assert again == job


def test_submit_answers_202_at_once_then_poll(serve, clip: bytes) -> None:
    c = serve()
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": "2", "output": "flac"})
    assert r.status_code == 202
    first = r.json()
    assert first["status"] in ("queued", "preparing", "running") and first["audio_url"] is None and first["cache_hit"] is False
    done = finished(c, first["id"])
    assert done["status"] == "succeeded" and done["video_url"] is None
    audio = c.get(done["audio_url"])
    assert audio.headers["content-type"] == "audio/flac"
    with open_media(audio.content) as a:
        assert a.format.name == "flac" and a.streams.audio[0].rate == 48000
    r = c.get(f"/v1/generations/{first['id']}/video")
    assert r.status_code == 404 and error_of(r)["code"] == "not_available"


def test_wav_output_and_recent_list(serve, clip: bytes) -> None:
    c = serve()
    a = submit(c, clip, wait=60, output="wav", prompt="first", priority="bulk")
    b = submit(c, clip, wait=60, output="wav", prompt="second", seed=3)
    assert a["status"] == b["status"] == "succeeded" and a["priority"] == "bulk"
    with open_media(c.get(a["audio_url"]).content) as f:
        assert f.format.name == "wav"
    items = c.get("/v1/generations?limit=5").json()["items"]
    assert [j["id"] for j in items[:2]] == [b["id"], a["id"]]  # newest first
    assert [j["prompt"] for j in items[:2]] == ["second", "first"]
    assert len(c.get("/v1/generations?limit=1").json()["items"]) == 1


def test_result_cache_hit_is_served_and_downloadable(serve, clip: bytes) -> None:
    c = serve(cache="memory")
    first = submit(c, clip, wait=60, prompt="glass  breaking", output="wav")
    second = submit(c, clip, wait=60, prompt="glass breaking", output="mp4")  # same after normalising
    assert first["cache_hit"] is False and second["cache_hit"] is True
    assert second["status"] == "succeeded"
    with open_media(c.get(second["video_url"]).content) as v:
        assert v.streams.audio


def test_wait_that_runs_out_answers_202(serve, clip: bytes) -> None:
    c = serve()
    t0 = time.monotonic()
    r = c.post("/v1/generations?wait=0.3", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": LONG})
    assert r.status_code == 202 and r.json()["status"] in ("queued", "preparing", "running")
    assert time.monotonic() - t0 >= 0.3
    c.delete(f"/v1/generations/{r.json()['id']}")
    assert finished(c, r.json()["id"])["status"] == "cancelled"


# ------------------------------------------------------------------------------- cancelling


def test_cancel_running_and_queued_jobs(serve, clip: bytes) -> None:
    c = serve(max_batch_size=1, max_wait_ms=0)
    running = submit(c, clip, steps=LONG)
    denoising(c, running["id"])
    queued = submit(c, clip, steps=LONG, seed=1)
    assert c.get(f"/v1/generations/{queued['id']}").json()["status"] in ("queued", "preparing")

    r = c.delete(f"/v1/generations/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # queued: at once
    r = c.delete(f"/v1/generations/{running['id']}")
    assert r.status_code == 200 and r.json()["id"] == running["id"]
    done = finished(c, running["id"])
    assert done["status"] == "cancelled" and done["error"] is None and done["audio_url"] is None
    assert 0 < done["progress"]["step"] < 1000

    r = c.get(f"/v1/generations/{running['id']}/audio")
    assert r.status_code == 404 and error_of(r)["code"] == "not_available"
    assert c.delete(f"/v1/generations/{running['id']}").json()["status"] == "cancelled"  # idempotent
    uploads = list((c.app.state.service.store.uploads_dir).iterdir())
    assert uploads == []  # ended jobs leave no upload behind


def test_download_before_the_end_is_409(serve, clip: bytes) -> None:
    c = serve()
    job = submit(c, clip, steps=LONG)
    r = c.get(f"/v1/generations/{job['id']}/audio")
    assert r.status_code == 409 and error_of(r)["code"] == "not_finished"
    c.delete(f"/v1/generations/{job['id']}")
    finished(c, job["id"])


# ------------------------------------------------------------------------------ bad input


def test_text_file_is_415_naming_what_was_received(serve) -> None:
    c = serve()
    r = c.post("/v1/generations", files={"video": ("notes.mp4", b"these are my notes\n" * 30, "video/mp4")})
    assert r.status_code == 415
    err = error_of(r)
    assert err["code"] == "unsupported_media_type" and "text file" in err["message"] and "notes.mp4" in err["message"]


def test_audio_file_and_image_are_415(serve, tmp_path: Path) -> None:
    c = serve()
    wav = tmp_path / "a.wav"
    media.write_audio(wav, np.zeros((1, 4800), np.float32))
    r = c.post("/v1/generations", files={"video": ("a.wav", wav.read_bytes(), "audio/wav")})
    assert r.status_code == 415 and "audio" in error_of(r)["message"].lower()
    flac = tmp_path / "a.flac"
    media.write_audio(flac, np.zeros((1, 4800), np.float32))
    r = c.post("/v1/generations", files={"video": ("a.flac", flac.read_bytes(), "audio/flac")})
    assert r.status_code == 415 and "FLAC" in error_of(r)["message"]
    png = io.BytesIO()
    with av.open(png, "w", format="image2pipe") as out:
        s = out.add_stream("png")
        s.width, s.height, s.pix_fmt = 32, 32, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            out.mux(p)
    r = c.post("/v1/generations", files={"video": ("still.png", png.getvalue(), "image/png")})
    assert r.status_code == 415 and "PNG image" in error_of(r)["message"]


def test_corrupt_empty_short_and_huge_videos_are_422(serve, clip: bytes) -> None:
    c = serve(max_video_pixels=100 * 100)
    r = c.post("/v1/generations", files={"video": ("cut.mp4", clip[: len(clip) // 2], "video/mp4")})
    err = error_of(r)
    assert r.status_code == 422 and err["code"] == "invalid_video" and "truncated or corrupt" in err["message"]
    assert str(c.app.state.service.store.data_dir) not in err["message"]  # no server paths

    r = c.post("/v1/generations", files={"video": ("empty.mp4", b"", "video/mp4")})
    assert r.status_code == 422 and "empty" in error_of(r)["message"]

    r = c.post("/v1/generations", files={"video": ("short.mp4", make_clip(0.4), "video/mp4")})
    err = error_of(r)
    assert r.status_code == 422 and err["code"] == "video_too_short" and "0.40 s" in err["message"]

    r = c.post("/v1/generations", files={"video": ("big.mp4", make_clip(1.0, size=(160, 120)), "video/mp4")})
    err = error_of(r)
    assert r.status_code == 422 and err["code"] == "video_too_large" and "160x120" in err["message"]
    assert list(c.app.state.service.store.uploads_dir.iterdir()) == []
    assert c.get("/v1/generations").json()["items"] == []  # nothing was queued


@pytest.mark.parametrize(
    ("fields", "query", "named"),
    [
        ({"steps": "0"}, "", "steps must be an integer from 1 to 1000, got '0'"),
        ({"steps": "ten"}, "", "steps must be an integer from 1 to 1000"),
        ({"guidance": "150"}, "", "guidance must be a number from 0 to 100"),
        ({"guidance": "nan"}, "", "guidance must be a number from 0 to 100"),
        ({"seed": "-1"}, "", "seed must be an integer from 0 to"),
        ({"output": "ogg"}, "", "output must be one of mp4, wav, flac"),
        ({"priority": "urgent"}, "", "priority must be interactive or bulk"),
        ({"keep_original_audio": "9"}, "", "keep_original_audio must be a number from 0 to 4"),
        ({"keep_original_audio": "0.5", "output": "wav"}, "", "keep_original_audio applies to output=mp4 only"),
        ({"stpes": "4"}, "", "unknown form field 'stpes'"),
        ({}, "?wait=601", "wait must be a number of seconds from 0 to 600"),
    ],
)
def test_out_of_range_parameters_are_422_naming_the_field(serve, clip: bytes, fields, query, named) -> None:
    c = serve()
    r = c.post(f"/v1/generations{query}", files={"video": ("clip.mp4", clip, "video/mp4")}, data=fields)
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["code"] == "invalid_parameter" and named in err["message"], err


def test_prompt_length_limit_and_missing_video(serve, clip: bytes) -> None:
    c = serve(max_prompt_chars=10)
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"prompt": "x" * 11})
    assert r.status_code == 422 and "prompt must be text of at most 10 characters" in error_of(r)["message"]
    r = c.post("/v1/generations", data={"prompt": "no file"})  # urlencoded: not a form that can carry a video
    assert r.status_code == 415 and "multipart/form-data" in error_of(r)["message"]
    r = c.post("/v1/generations", files={"prompt": (None, "no file")})
    assert r.status_code == 422 and "video is required" in error_of(r)["message"]


def test_upload_over_the_limit_is_413_however_it_arrives(serve) -> None:
    c = serve(max_upload_mb=0.01)  # 10 KiB
    big = make_clip(1.0) + b"\0" * (2 << 20)  # far over: refused from Content-Length
    r = c.post("/v1/generations", files={"video": ("big.mp4", big, "video/mp4")})
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large" and "0.01 MiB" in error_of(r)["message"]

    # Just over the file limit but within the form allowance: stopped while copying the upload.
    r = c.post("/v1/generations", files={"video": ("big.mp4", b"\0" * 20_000, "video/mp4")})
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"

    # No Content-Length (chunked): stopped while the body streams in.
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"a.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + b"\0" * (2 << 20) + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = c.post("/v1/generations", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"
    assert list(c.app.state.service.store.uploads_dir.iterdir()) == []


def test_unknown_and_malformed_ids_are_404(serve) -> None:
    c = serve()
    for path in ("/v1/generations/0123456789abcdef0123456789abcdef", "/v1/generations/..%2F..%2Fjobs.sqlite3",
                 "/v1/generations/nothex/audio", "/v1/generations/0123456789abcdef0123456789abcdef/video"):
        r = c.get(path)
        assert r.status_code == 404 and error_of(r)["code"] == "not_found", (path, r.text)
    r = c.delete("/v1/generations/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = c.get("/no/such/route")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = c.put("/v1/generations")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_full_queue_is_429_with_retry_after(serve, clip: bytes) -> None:
    c = serve(max_batch_size=1, max_queue=1, max_wait_ms=0)
    running = submit(c, clip, steps=LONG)
    denoising(c, running["id"])  # out of the queue
    waiting = submit(c, clip, steps=LONG, seed=2)  # the one queue place
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": "2"})
    assert r.status_code == 429
    assert error_of(r)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    for job in (waiting, running):
        c.delete(f"/v1/generations/{job['id']}")
        assert finished(c, job["id"])["status"] == "cancelled"


def test_a_bad_job_fails_alone(serve, clip: bytes) -> None:
    # 0.6 s passes the upload check (header) but has 15 frames at 25 fps, one short of a window:
    # the batcher's decode refuses it while a good job submitted alongside completes.
    c = serve(max_batch_size=2, max_wait_ms=200)
    bad = submit(c, make_clip(0.6))
    good = submit(c, clip, seed=4)
    bad_done, good_done = finished(c, bad["id"]), finished(c, good["id"])
    assert good_done["status"] == "succeeded", good_done
    assert bad_done["status"] == "failed" and bad_done["audio_url"] is None
    assert bad_done["error"]["code"] == "video_too_short" and "15 frame" in bad_done["error"]["message"]
    assert str(c.app.state.service.store.data_dir) not in json.dumps(bad_done)


# ---------------------------------------------------------------------------- access rules


def test_api_key_guards_the_api_but_not_probes_or_page(serve, clip: bytes) -> None:
    c = serve(api_key="s3cret", metrics_public=False)
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")})
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    r = c.get("/v1/generations", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong" in error_of(r)["message"]
    assert c.get("/metrics").status_code == 401
    for path in ("/healthz", "/readyz", "/", "/docs"):
        assert c.get(path).status_code == 200, path

    key = {"Authorization": "Bearer s3cret"}
    r = c.post("/v1/generations?wait=60", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": "2"}, headers=key)
    assert r.status_code == 200, r.text
    assert c.get(r.json()["audio_url"]).status_code == 401
    assert c.get(r.json()["audio_url"], headers=key).status_code == 200
    assert c.get("/metrics", headers=key).status_code == 200


def test_metrics_can_be_public_with_a_key(serve) -> None:
    c = serve(api_key="s3cret", metrics_public=True)
    assert c.get("/metrics").status_code == 200


def test_cors_origins(serve) -> None:
    c = serve(cors_origins=["https://studio.example"])
    r = c.options("/v1/generations", headers={"Origin": "https://studio.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://studio.example"
    r = c.options("/v1/generations", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_internal_errors_answer_a_generic_500(serve, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    c = serve()

    def boom(limit: int = 20, owner: str | None = None):
        raise RuntimeError("secret detail /srv/data")

    monkeypatch.setattr(c.app.state.service.store, "recent", boom)
    r = c.get("/v1/generations")
    assert r.status_code == 500
    err = error_of(r)
    assert err["code"] == "internal_error" and "secret" not in r.text
    assert "secret detail" in caplog.text  # logged for the operator


# ------------------------------------------------------------------------- probes and docs


def test_health_ready_page_static_and_docs(serve) -> None:
    c = serve()
    assert c.get("/healthz").json() == {"status": "ok", "storage": "ok"}
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"] and ready["device"] == "cpu"
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    if (server_app.STATIC_DIR / "app.js").is_file():
        assert c.get("/static/app.js").status_code == 200
    schema = c.get("/openapi.json").json()
    post = schema["paths"]["/v1/generations"]["post"]
    assert set(post["responses"]) >= {"200", "202", "413", "415", "422", "429"}
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "Denoising steps" in form["properties"]["steps"]["description"] and form["properties"]["steps"]["maximum"] == 1000
    # The video is optional: without it, duration makes text-to-audio (tests/test_server_samples.py).
    assert form["properties"]["video"]["format"] == "binary" and "required" not in form
    assert "text to audio" in form["properties"]["video"]["description"]
    info = c.get("/v1/info").json()
    assert info["limits"]["steps"] == [1, 1000] and info["defaults"]["steps"] == 50 and info["auth"] is False


def test_page_fallback_without_static_folder(serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(server_app, "STATIC_DIR", tmp_path / "missing")
    c = serve()
    r = c.get("/")
    assert r.status_code == 200 and 'href="docs"' in r.text
    assert c.get("/static/app.js").status_code == 404


def test_readyz_is_503_until_the_model_loads(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: bytes) -> None:
    import threading

    from foleyserve.pipeline.pipeline import Engine as EngineClass

    release = threading.Event()

    def slow_load(config: EngineConfig) -> Engine:
        assert config.demo
        release.wait(30)
        return engine

    monkeypatch.setattr(EngineClass, "from_config", staticmethod(slow_load))
    app = create_app(ServerConfig(data_dir=tmp_path, cache="off"), EngineConfig(demo=True))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert submit(c, clip, wait=60)["status"] == "succeeded"


def test_a_model_that_fails_to_load_keeps_readyz_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from foleyserve.pipeline.pipeline import Engine as EngineClass

    def broken(config: EngineConfig) -> Engine:
        raise FileNotFoundError("/models/secret/path missing")

    monkeypatch.setattr(EngineClass, "from_config", staticmethod(broken))
    app = create_app(ServerConfig(data_dir=tmp_path), EngineConfig(demo=True))
    with TestClient(app) as c:
        wait_until(lambda: app.state.service.load_error is not None)
        r = c.get("/readyz")
        assert r.status_code == 503 and error_of(r)["code"] == "load_failed" and "secret" not in r.text
        assert c.get("/healthz").status_code == 200


def wait_until(pred, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_expose_the_series(serve, clip: bytes) -> None:
    c = serve(cache="memory")
    job = submit(c, clip, wait=60)
    submit(c, clip, wait=60)  # a result-cache hit
    c.post("/v1/generations", files={"video": ("n.txt", b"not a video at all\n" * 5, "text/plain")})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("foleyserve_requests_total", (("status", "succeeded"),))] == 2
    assert samples[("foleyserve_requests_total", (("status", "rejected"),))] == 1
    assert samples[("foleyserve_stage_seconds_count", (("stage", "dit"),))] == 1  # the hit ran no DiT
    assert samples[("foleyserve_batch_size_count", ())] == 1
    assert samples[("foleyserve_queue_depth", ())] == 0
    assert samples[("foleyserve_cache_hits_total", (("level", "result"),))] == 1
    assert samples[("foleyserve_cache_misses_total", (("level", "result"),))] == 1
    assert samples[("foleyserve_audio_seconds_total", ())] == pytest.approx(2 * job["duration"])
    assert samples[("foleyserve_request_seconds_count", (("status", "succeeded"),))] == 2
    assert samples[("foleyserve_host_rss_bytes", ())] > 10 * 2**20
    assert samples[("foleyserve_ready", ())] == 1

    def down() -> dict:
        raise ConnectionError("cache backend down")

    c.app.state.service.cache.stats = down  # a broken source costs its series, not the scrape
    r = c.get("/metrics")
    assert r.status_code == 200 and "foleyserve_cache_hits_total" not in r.text and "foleyserve_queue_depth" in r.text


# ------------------------------------------------------------------------- restart, retention


def test_restart_serves_finished_jobs_again(serve, clip: bytes, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = serve(data_dir=data)
    job = submit(first, clip, wait=60, prompt="kept")
    wav = first.get(job["audio_url"]).content
    first.__exit__(None, None, None)

    second = serve(data_dir=data)
    again = second.get(f"/v1/generations/{job['id']}").json()
    assert again["status"] == "succeeded" and again["prompt"] == "kept" and again["timings"] == job["timings"]
    assert second.get(again["audio_url"]).content == wav
    with open_media(second.get(again["video_url"]).content) as v:
        assert v.streams.audio


def test_restart_requeues_interrupted_jobs_or_fails_them(serve, clip: bytes, tmp_path: Path) -> None:
    # What a crash leaves behind: one queued job with its upload, one running job whose upload is gone.
    data = tmp_path / "crashed"
    store = JobStore(data)
    params = {"prompt": "", "negative_prompt": "noisy, harsh", "steps": 2, "guidance": 4.5, "seed": 0,
              "output": "wav", "keep_original_audio": None}
    queued, lost = "a" * 32, "b" * 32
    store.add(JobRecord(id=queued, status="queued", priority="interactive", params=params, created=time.time(), upload=f"{queued}.upload"))
    store.upload_path(queued).write_bytes(clip)
    store.add(JobRecord(id=lost, status="running", priority="interactive", params=params, created=time.time(), upload=f"{lost}.upload"))
    store.upload_path("c" * 32).write_bytes(b"orphan")
    store.close()

    c = serve(data_dir=data)
    done = finished(c, queued)
    assert done["status"] == "succeeded" and c.get(done["audio_url"]).status_code == 200
    failed = c.get(f"/v1/generations/{lost}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "interrupted"
    assert "submit it again" in failed["error"]["message"]
    assert list((data / "uploads").iterdir()) == []


def test_shutdown_keeps_unfinished_jobs_for_the_next_start(serve, clip: bytes, tmp_path: Path) -> None:
    data = tmp_path / "restart"
    first = serve(data_dir=data, max_batch_size=1, max_wait_ms=0, shutdown_grace_s=0.1)
    running = submit(first, clip, steps=LONG)
    denoising(first, running["id"])
    waiting = submit(first, clip, seed=9)
    first.__exit__(None, None, None)  # the running job is cut short after 0.1 s, the other never ran
    store = JobStore(data)
    statuses = {r.id: r.status for r in store.active()}
    assert statuses[running["id"]] == "running" and statuses[waiting["id"]] in ("queued", "preparing")
    store.close()

    second = serve(data_dir=data, max_batch_size=1, max_wait_ms=0)
    again = second.get(f"/v1/generations/{running['id']}").json()
    assert again["status"] in ("queued", "preparing", "running") and again["progress"]["step"] < 1000  # re-queued from its upload
    second.delete(f"/v1/generations/{running['id']}")
    assert finished(second, running["id"])["status"] == "cancelled"
    assert finished(second, waiting["id"])["status"] == "succeeded"


def test_retention_expires_old_results(serve, clip: bytes) -> None:
    c = serve(retention_hours=1.0)
    job = submit(c, clip, wait=60)
    service = c.app.state.service
    assert service.enforce_retention() == []
    assert service.enforce_retention(now=time.time() + 2 * 3600) == [job["id"]]
    body = c.get(f"/v1/generations/{job['id']}").json()
    assert body["expired"] is True and body["audio_url"] is None and body["status"] == "succeeded"
    r = c.get(f"/v1/generations/{job['id']}/audio")
    assert r.status_code == 410 and error_of(r)["code"] == "expired"
    assert list(service.store.results_dir.iterdir()) == []


def test_progress_writes_are_throttled_but_status_changes_are_not(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    c = serve()
    service = c.app.state.service
    job_id = "d" * 32
    service.store.add(_record(job_id, time.time()))
    writes: list[dict] = []
    real = service.store.update_if_active
    monkeypatch.setattr(service.store, "update_if_active", lambda i, **kw: writes.append(kw) or real(i, **kw))
    clock = [1000.0]
    monkeypatch.setattr(server_service.time, "time", lambda: clock[0])

    for step in range(1, 41):  # 40 steps, 10 ms apart: 0.4 s
        service._on_update(SimpleNamespace(id=job_id, status="running", progress=(step, 50)))
        clock[0] += 0.01
    assert 2 <= len(writes) <= 3  # the first report, then one per 0.2 s
    assert writes[0]["status"] == "running" and writes[0].get("started") == 1000.0
    assert 21 <= service.store.get(job_id).progress_step <= 40  # a later report reached the disk

    service._on_update(SimpleNamespace(id=job_id, status="failed", progress=(41, 50), error=RuntimeError("x"),
                                       error_code="internal", cache_hit=False, batch_size=1, result=None))
    rec = service.store.get(job_id)
    assert rec.status == "failed" and rec.progress_step == 41 and rec.error_code == "internal_error"
    assert "x" not in rec.error_message  # internal details stay in the log


# ----------------------------------------------------------------------------- the job store


def _record(job_id: str, created: float, **kw) -> JobRecord:
    return JobRecord(id=job_id, status=kw.pop("status", "queued"), priority="interactive",
                     params={"prompt": "p", "output": "wav"}, created=created, **kw)


def test_store_persists_rows_and_ends_a_job_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.add(_record("1" * 32, 1.0))
    assert store.update_if_active("1" * 32, status="running", progress_step=3, progress_total=10)
    assert store.update_if_active("1" * 32, status="succeeded", finished=2.0, timings={"dit": 0.5}, files={"audio": "x.wav"})
    assert not store.update_if_active("1" * 32, status="running", progress_step=4)  # a late report
    store.close()
    again = JobStore(tmp_path)
    rec = again.get("1" * 32)
    assert rec is not None and rec.status == "succeeded" and rec.progress_step == 3
    assert rec.timings == {"dit": 0.5} and rec.files == {"audio": "x.wav"} and rec.is_final
    with pytest.raises(ValueError, match="bogus"):
        again.update("1" * 32, bogus=1)
    again.close()


def test_store_retention_by_size_removes_the_oldest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    for i, job_id in enumerate(("1" * 32, "2" * 32, "3" * 32)):
        store.add(_record(job_id, float(i), status="succeeded", finished=100.0 + i,
                          files={"audio": f"{job_id}.wav"}, result_bytes=1000))
        store.result_path(f"{job_id}.wav").write_bytes(b"\0" * 1000)
    assert store.enforce_retention(max_age_s=None, max_bytes=2500, now=200.0) == ["1" * 32]
    assert store.enforce_retention(max_age_s=None, max_bytes=2500, now=200.0) == []
    assert not store.result_path("1" * 32 + ".wav").exists() and store.result_path("2" * 32 + ".wav").exists()
    assert store.enforce_retention(max_age_s=98.5, max_bytes=None, now=200.0) == ["2" * 32]
    assert store.get("2" * 32).expired == 200.0 and store.get("3" * 32).expired is None
    store.close()
