"""The service's hard edges: a disk that refuses writes, refusals decided before the upload,
strict form parsing, verified results, DELETE of finished jobs, per-client job lists, and what a
real socket sees (keep-alive latency, early 401)."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import uvicorn

from foleyserve import Engine
from foleyserve.commands.serve import _listen
from foleyserve.server import storage as server_storage
from foleyserve.server.app import create_app
from foleyserve.server.jobs import JobStore
from foleyserve.server.settings import ServerConfig
from test_server import clip, engine, error_of, finished, serve, submit  # noqa: F401  (fixtures shared with test_server)

Usage = namedtuple("Usage", "total used free")


@pytest.fixture()
def live(engine: Engine, tmp_path: Path):
    """A real uvicorn server on a loopback port (what TestClient cannot show: sockets)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**options) -> int:
        config = ServerConfig(data_dir=tmp_path / "live", **{"cache": "memory", **options})
        sock = _listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(config, engine=engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the live server did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return sock.getsockname()[1]

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=20)


# ------------------------------------------------------------------------------- storage faults


class RefusingDisk:
    """Makes the job store's writes fail as SQLite does on a full disk, and the data directory
    look full to the health check, until ``heal()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: JobStore) -> None:
        self.full = False
        real_update, real_add = store.update_if_active, store.add

        def update_if_active(job_id, **changes):
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return real_update(job_id, **changes)

        def add(record):
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return real_add(record)

        real_usage = server_storage.shutil.disk_usage
        monkeypatch.setattr(store, "update_if_active", update_if_active)
        monkeypatch.setattr(store, "add", add)
        monkeypatch.setattr(server_storage.shutil, "disk_usage",
                            lambda p: Usage(1 << 30, 1 << 30, 0) if self.full else real_usage(p))

    def fill(self) -> None:
        self.full = True

    def heal(self) -> None:
        self.full = False


def test_a_job_ending_on_a_full_disk_reaches_a_final_state_and_is_written_once_the_disk_recovers(
    serve, clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = serve(retention_interval_s=0.2)
    service = c.app.state.service
    disk = RefusingDisk(monkeypatch, service.store)
    job = submit(c, clip, steps=3)
    disk.fill()  # the disk fills while the job runs: its final write fails
    done = finished(c, job["id"])
    assert done["status"] in ("succeeded", "failed")  # from memory: never stuck "running"
    assert service.store.get(job["id"]).status in ("queued", "preparing", "running")  # the row is behind
    # A full data dir refuses new uploads up front, and readiness says why.
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": "2"})
    assert r.status_code == 507 and error_of(r)["code"] == "insufficient_storage" and "full" in error_of(r)["message"]
    time.sleep(1.1)  # the health check caches its answer for a second
    ready = c.get("/readyz")
    assert ready.status_code == 503 and error_of(ready)["code"] == "storage_unavailable"
    assert "full" in c.get("/healthz").json()["storage"]
    disk.heal()
    deadline = time.monotonic() + 10
    while service.store.get(job["id"]).status != done["status"]:
        assert time.monotonic() < deadline, "the final state was never written after the disk recovered"
        time.sleep(0.1)
    time.sleep(1.1)
    assert c.get("/readyz").status_code == 200 and c.get("/healthz").json()["storage"] == "ok"
    assert submit(c, clip, seed=5)["status"] in ("queued", "preparing", "running", "succeeded")


def test_a_result_write_on_a_full_disk_fails_the_job_with_a_storage_code(serve, clip: bytes, monkeypatch) -> None:
    import errno

    from foleyserve.server import service as server_service

    c = serve()

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server_service, "file_digest", no_space)
    done = finished(c, submit(c, clip, steps=2, output="wav")["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "storage_unavailable"
    assert "disk is full" in done["error"]["message"] and "/" not in done["error"]["message"]


def test_an_upload_the_disk_refuses_is_507_json(serve, clip: bytes, monkeypatch) -> None:
    import builtins
    import errno

    c = serve()
    real_open = builtins.open

    def refusing_open(path, mode="r", *a, **k):
        if str(path).endswith(".upload") and "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", refusing_open)
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"steps": "2"})
    assert r.status_code == 507 and "read-only" in error_of(r)["message"] and "Traceback" not in r.text


def test_schema_1_databases_are_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, priority TEXT NOT NULL, params TEXT NOT NULL,"
        " created REAL NOT NULL, started REAL, finished REAL, cache_hit INTEGER NOT NULL DEFAULT 0, error_code TEXT,"
        " error_message TEXT, timings TEXT NOT NULL DEFAULT '{}', files TEXT NOT NULL DEFAULT '{}',"
        " result_bytes INTEGER NOT NULL DEFAULT 0, progress_step INTEGER NOT NULL DEFAULT 0,"
        " progress_total INTEGER NOT NULL DEFAULT 0, upload TEXT, audio_seconds REAL, video_seconds REAL,"
        " batch_size INTEGER, warnings TEXT NOT NULL DEFAULT '[]', expired REAL);"
        "INSERT INTO jobs (id, status, priority, params, created) VALUES ('a' , 'succeeded', 'bulk', '{}', 1.0);"
        "PRAGMA user_version=1;"
    )
    db.close()
    store = JobStore(tmp_path)
    rec = store.get("a")
    assert rec is not None and rec.owner is None and rec.checksums == {}
    assert [r.id for r in store.recent(5)] == ["a"]
    store.close()


# ------------------------------------------------------------------------------ strict forms


def multipart(parts: list[tuple[str, bytes, str | None]], *, close: bool = True) -> tuple[bytes, str]:
    boundary = "foleyboundary1234"
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "parts, close, status, words",
    [
        ([("video", b"V", "a.mp4"), ("video", b"W", "b.mp4")], True, 422, "'video' was sent more than once"),
        ([("video", b"V", "a.mp4"), ("prompt", b"a", None), ("prompt", b"b", None)], True, 422, "'prompt' was sent more than once"),
        ([("video", b"V", "a.mp4"), ("steps", b"", None)], True, 422, "'steps' is empty"),
        ([("video", b"V", "a.mp4"), ("prompt", b"caf\xe9 \xff", None)], True, 422, "not valid UTF-8"),
        ([("video", b"V" * 100, "a.mp4")], False, 400, "closing boundary"),
        ([("prompt", b"x", None)], True, 422, "video is required"),
    ],
)
def test_ambiguous_forms_are_refused_naming_the_field(serve, parts, close, status, words) -> None:
    c = serve()
    body, content_type = multipart(parts, close=close)
    r = c.post("/v1/generations", content=body, headers={"content-type": content_type})
    assert r.status_code == status and words in error_of(r)["message"], r.text
    assert not list((c.app.state.service.store.uploads_dir).iterdir())  # nothing left behind


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"--other\r\nContent-Disposition: form-data; name=\"video\"\r\n\r\nV\r\n--other--\r\n", "multipart/form-data; boundary=foley"),
        (b"--foley\nContent-Disposition: form-data; name=\"video\"\n\nV\n--foley--\n", "multipart/form-data; boundary=foley"),
    ],
    ids=["wrong-boundary", "lf-only"],
)
def test_malformed_multipart_is_400_not_500(serve, body: bytes, content_type: str) -> None:
    c = serve()
    r = c.post("/v1/generations", content=body, headers={"content-type": content_type})
    assert r.status_code == 400 and error_of(r)["code"] in ("malformed_body", "incomplete_body"), r.text


def test_a_half_applied_migration_is_completed(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.close()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("PRAGMA user_version=1")  # as if a kill landed between the ALTERs and the version bump
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    assert store.recent(1) == []
    store.close()


def test_a_final_state_the_store_refuses_for_another_reason_is_kept_and_retried(serve, clip: bytes, monkeypatch) -> None:
    c = serve()
    service = c.app.state.service
    job = finished(c, submit(c, clip, steps=2)["id"])
    service._unsaved[job["id"]] = {"status": "failed", "error_code": "x", "error_message": "y"}
    real = service.store.update_if_active
    monkeypatch.setattr(service.store, "update_if_active", lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")))
    assert service.retry_unsaved() == 1  # not dropped on an error that is not the disk
    monkeypatch.setattr(service.store, "update_if_active", real)
    assert service.retry_unsaved() == 0


def test_utf8_prompts_and_files_without_a_filename_are_accepted(serve, clip: bytes) -> None:
    c = serve()
    body, content_type = multipart([("video", clip, None), ("prompt", "café au lait, 雨".encode(), None), ("steps", b"2", None)])
    r = c.post("/v1/generations?wait=60", content=body, headers={"content-type": content_type})
    assert r.status_code in (200, 202) and r.json()["prompt"] == "café au lait, 雨"


def test_a_prompt_over_claps_token_limit_is_422_at_submission(serve, clip: bytes) -> None:
    c = serve(max_prompt_chars=20000)
    r = c.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data={"prompt": "rain " * 3000})
    assert r.status_code == 422 and error_of(r)["code"] == "prompt_too_long" and "tokens" in error_of(r)["message"]
    assert c.get("/v1/generations").json()["items"] == []  # nothing was queued


# --------------------------------------------------------------------------- results and DELETE


def test_delete_of_a_finished_job_deletes_its_files(serve, clip: bytes) -> None:
    c = serve()
    done = finished(c, submit(c, clip, steps=2)["id"])
    assert done["status"] == "succeeded" and c.get(done["audio_url"]).status_code == 200
    files = list(c.app.state.service.store.results_dir.glob(f"{done['id']}.*"))
    assert files
    r = c.delete(f"/v1/generations/{done['id']}")
    assert r.status_code == 200 and r.json()["expired"] is True and r.json()["audio_url"] is None
    assert not any(f.exists() for f in files)
    assert c.get(done["audio_url"]).status_code == 410
    assert c.delete(f"/v1/generations/{done['id']}").status_code == 200  # idempotent


def test_damaged_or_missing_results_are_never_served(serve, clip: bytes) -> None:
    c = serve()
    store = c.app.state.service.store
    corrupt = finished(c, submit(c, clip, steps=2, output="wav")["id"])
    path = store.result_path(f"{corrupt['id']}.wav")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    r = c.get(corrupt["audio_url"])
    assert r.status_code == 410 and error_of(r)["code"] == "result_damaged" and "checksum" in error_of(r)["message"]
    empty = finished(c, submit(c, clip, steps=2, seed=1, output="wav")["id"])
    store.result_path(f"{empty['id']}.wav").write_bytes(b"")
    assert error_of(c.get(empty["audio_url"]))["code"] == "result_damaged"
    gone = finished(c, submit(c, clip, steps=2, seed=2, output="wav")["id"])
    store.result_path(f"{gone['id']}.wav").unlink()
    body = c.get(f"/v1/generations/{gone['id']}").json()
    assert body["expired"] is True and body["audio_url"] is None
    assert c.get(f"/v1/generations/{gone['id']}/audio").status_code == 410


def test_each_client_lists_only_its_own_jobs(serve, clip: bytes) -> None:
    c = serve()
    a = {"X-Client-Id": "client-aaaa-1111"}
    b = {"X-Client-Id": "client-bbbb-2222"}
    ja = c.post("/v1/generations", files={"video": ("c.mp4", clip, "video/mp4")}, data={"steps": "2", "prompt": "A's secret"}, headers=a).json()
    jb = c.post("/v1/generations", files={"video": ("c.mp4", clip, "video/mp4")}, data={"steps": "2", "prompt": "B's"}, headers=b).json()
    assert [j["id"] for j in c.get("/v1/generations", headers=a).json()["items"]] == [ja["id"]]
    assert [j["id"] for j in c.get("/v1/generations", headers=b).json()["items"]] == [jb["id"]]
    assert c.get("/v1/generations").json()["items"] == []  # anonymous callers see no one's prompts


# ------------------------------------------------------------------------------------ routes


def test_head_on_health_routes_and_a_full_allow_header(serve) -> None:
    c = serve()
    assert c.head("/healthz").status_code == 200 and c.head("/readyz").status_code == 200
    r = c.put("/v1/generations")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST" and "use GET, HEAD, POST" in error_of(r)["message"]
    r = c.post("/v1/generations/" + "a" * 32)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"DELETE", "GET", "HEAD"}


# ----------------------------------------------------------------------------- real sockets


def _request(sock: socket.socket, raw: bytes) -> bytes:
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head


def test_keep_alive_requests_after_the_first_answer_fast(live) -> None:
    port = live()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            head = _request(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            times.append(time.perf_counter() - t0)
            assert head.startswith(b"HTTP/1.1 200")
    # Nagle + delayed ACK made every request after the first wait ~40 ms.
    assert sorted(times[1:])[len(times[1:]) // 2] < 0.005, times


def test_a_big_upload_without_the_key_is_refused_before_its_body_is_read(live) -> None:
    port = live(api_key="the-key", max_upload_mb=100)
    total = 60 << 20
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {total}\r\n\r\n".encode()
        )
        sock.setblocking(False)
        chunk = b"\0" * (256 << 10)
        answer = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sent < total:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            if b"\r\n\r\n" in answer:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(5)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent < 20 << 20, f"{sent / 2**20:.1f} MiB were sent before the refusal"


# ------------------------------------------------------------------------------ bounded memory


@pytest.mark.slow
def test_a_16_s_1080p_job_stays_within_1_2_gb_of_the_idle_server(tmp_path: Path) -> None:
    """Full-resolution frames are reduced as they are decoded (it was +3.3 GB for this clip)."""
    import io
    import os
    import re
    import subprocess
    import sys

    import av
    import httpx
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=25, options={"crf": "40", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        for i in range(16 * 25):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((1080, 1920, 3), (i * 7) % 256, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    clip = buf.getvalue()
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.Popen(
        [sys.executable, "-m", "foleyserve", "serve", "--demo", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cache", "off", "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(src)}, stderr=subprocess.PIPE, text=True,
    )

    def memory(key: str) -> int:
        line = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    try:
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line, "the server exited"
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            port = int(m.group(1)) if m else None
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # The peak so far, not the current RSS: pages reclaimed from the idle server on a busy box
        # would come back during the job and read as growth.
        idle = max(memory("VmRSS"), memory("VmHWM"))
        r = httpx.post(url + "/v1/generations?wait=300", files={"video": ("hd.mp4", clip, "video/mp4")},
                       data={"steps": "2", "output": "wav"}, timeout=320)
        assert r.json()["status"] == "succeeded", r.text
        grown = memory("VmHWM") - idle
        assert grown < 1.2 * 2**30, f"the server grew by {grown / 2**20:.0f} MiB over idle for one 16 s 1080p job"
    finally:
        proc.terminate()
        proc.wait(30)
