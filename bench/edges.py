"""The service's hard edges, measured over real sockets against any checkout (before/after figures).

Starts ``foleyserve serve --demo`` from the source tree given by ``--src`` (default: this one) as
a subprocess, and measures what a client sees:

* ``keepalive``: the median time of GET /healthz requests 2-20 on one keep-alive connection;
* ``early_401``: bytes a client without the API key manages to send of a 60 MiB upload before
  the 401 arrives;
* ``queue_storm``: 16 clients x 4 jobs against ``--max-queue 2``, each honouring Retry-After:
  429s answered per accepted job, the Retry-After values, wall time;
* ``rss_1080p``: the server's resident memory while idle and its peak (VmHWM) over one 16 s
  1080p job;
* ``edges``: what the server answers to a repeated field, an empty ``steps=``, invalid UTF-8, a
  body without its closing boundary, a prompt over CLAP's token limit, HEAD /healthz, a PUT (and
  its Allow header), and whether DELETE of a finished job removes its files.

    python bench/edges.py --out bench/results/edges_after.json
    git worktree add /tmp/before <commit> && python bench/edges.py --src /tmp/before/src --out bench/results/edges_before.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_clip(seconds: float, size: tuple[int, int], fps: int = 25) -> bytes:
    buf = io.BytesIO()
    w, h = size
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "40", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(round(seconds * fps)):
            img = np.full((h, w, 3), (i * 7) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


class Server:
    def __init__(self, src: Path, data: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "foleyserve", "serve", "--demo", "--port", "0", "--data-dir", str(data), "--log-level", "warning", *args],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            port = int(m.group(1)) if m else None
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        assert port is not None, "the server did not start"
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        while True:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # printed its port before it accepts connections
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def keepalive(srv: Server) -> dict:
    times = []
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        for _ in range(20):
            t0 = time.perf_counter()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                data += sock.recv(65536)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"first_ms": round(times[0], 2), "median_after_first_ms": round(statistics.median(times[1:]), 2)}


def early_401(srv: Server, total: int = 60 << 20) -> dict:
    sent, answer = 0, b""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        # A well-formed multipart prefix, so a server that parses before it authenticates reads on.
        sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     + f"Content-Length: {total}\r\n\r\n".encode()
                     + b'--b\r\nContent-Disposition: form-data; name="video"; filename="a.mp4"\r\n\r\n')
        sock.setblocking(False)
        chunk = b"\0" * (256 << 10)
        while sent < total and b"\r\n\r\n" not in answer:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            except ConnectionError:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.002)
            except ConnectionError:
                break
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
                answer += more
        except (ConnectionError, TimeoutError):
            pass
    return {"status_line": answer.split(b"\r\n", 1)[0].decode(errors="replace"), "mib_sent_before_answer": round(sent / 2**20, 2),
            "seconds": round(time.perf_counter() - t0, 3)}


def queue_storm(srv: Server, clip: bytes, clients: int = 16, jobs_each: int = 4) -> dict:
    refusals: list[float] = []
    accepted = 0
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal accepted
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for j in range(jobs_each):
                while True:
                    r = c.post("/v1/generations", files={"video": ("c.mp4", clip, "video/mp4")},
                               data={"steps": "4", "seed": str(i * 100 + j), "output": "wav"})
                    if r.status_code == 429:
                        wait = float(r.headers.get("retry-after", "1"))
                        with lock:
                            refusals.append(wait)
                        time.sleep(wait)
                        continue
                    assert r.status_code in (200, 202), r.text
                    with lock:
                        accepted += 1
                    break

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "jobs": accepted, "responses_429": len(refusals), "per_job_429": round(len(refusals) / max(accepted, 1), 2),
        "retry_after_values": dict(sorted({str(v): refusals.count(v) for v in set(refusals)}.items(), key=lambda kv: float(kv[0]))),
        "seconds_to_admit_all": round(time.perf_counter() - t0, 1),
    }


def rss_1080p(srv: Server, clip: bytes) -> dict:
    idle = srv.status("VmRSS")
    r = httpx.post(srv.url + "/v1/generations?wait=600", files={"video": ("hd.mp4", clip, "video/mp4")},
                   data={"steps": "2", "output": "wav"}, timeout=700)
    body = r.json()
    return {"status": body.get("status"), "idle_mib": round(idle / 2**20), "peak_mib": round(srv.status("VmHWM") / 2**20),
            "peak_over_idle_mib": round((srv.status("VmHWM") - idle) / 2**20), "upload_kib": round(len(clip) / 1024)}


def _multipart(parts: list[tuple[str, bytes, str | None]], close: bool = True) -> tuple[bytes, str]:
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--bb\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + (b"--bb--\r\n" if close else b""), "multipart/form-data; boundary=bb"


def edges(srv: Server, clip: bytes, data: Path) -> dict:
    out: dict = {}
    c = httpx.Client(base_url=srv.url, timeout=120)
    cases = {
        "repeated_video": [("video", clip, "a.mp4"), ("video", clip, "b.mp4"), ("steps", b"2", None)],
        "empty_steps": [("video", clip, "a.mp4"), ("steps", b"", None)],
        "invalid_utf8_prompt": [("video", clip, "a.mp4"), ("prompt", b"caf\xe9", None), ("steps", b"2", None)],
    }
    for name, parts in cases.items():
        body, ctype = _multipart(parts)
        r = c.post("/v1/generations", content=body, headers={"content-type": ctype})
        out[name] = r.status_code
    body, ctype = _multipart([("video", clip, "a.mp4"), ("steps", b"2", None)], close=False)
    out["no_closing_boundary"] = c.post("/v1/generations", content=body, headers={"content-type": ctype}).status_code
    r = c.post("/v1/generations", files={"video": ("a.mp4", clip, "video/mp4")}, data={"prompt": "x," * 990, "steps": "2"})
    out["prompt_over_clap_limit"] = r.status_code
    out["head_healthz"] = c.head("/healthz").status_code
    r = c.put("/v1/generations")
    out["put_generations"] = {"status": r.status_code, "allow": r.headers.get("allow")}
    job = c.post("/v1/generations?wait=120", files={"video": ("a.mp4", clip, "video/mp4")}, data={"steps": "2", "output": "wav"}).json()
    before = sorted(p.name for p in (data / "results").glob(job["id"] + ".*"))
    r = c.delete(f"/v1/generations/{job['id']}")
    after = sorted(p.name for p in (data / "results").glob(job["id"] + ".*"))
    out["delete_finished"] = {"status": r.status_code, "files_before": len(before), "files_after": len(after)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the src/ folder of the checkout to measure")
    ap.add_argument("--phases", default="keepalive,early_401,queue_storm,rss_1080p,edges")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    phases = args.phases.split(",")
    small = make_clip(1.2, (64, 48))
    result: dict = {"src": str(args.src), "date": time.strftime("%Y-%m-%d"), "cpu": _cpu()}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            data = Path(tmp) / phase
            extra = {"early_401": ["--api-key", "k" * 16, "--max-upload-mb", "100"],
                     "queue_storm": ["--max-queue", "2", "--max-batch-size", "1", "--max-wait-ms", "0", "--cache", "off"],
                     "rss_1080p": ["--cache", "off"], "edges": ["--cache", "off"]}.get(phase, [])
            srv = Server(args.src, data, *extra)
            try:
                if phase == "keepalive":
                    result[phase] = keepalive(srv)
                elif phase == "early_401":
                    result[phase] = early_401(srv)
                elif phase == "queue_storm":
                    result[phase] = queue_storm(srv, small)
                elif phase == "rss_1080p":
                    result[phase] = rss_1080p(srv, make_clip(16.0, (1920, 1080)))
                elif phase == "edges":
                    result[phase] = edges(srv, small, data)
            except Exception as e:  # a phase the old code cannot run is a finding, not a crash
                result[phase] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                srv.close()
            print(json.dumps({phase: result[phase]}), flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
