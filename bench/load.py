#!/usr/bin/env python3
"""Load test for the foleyserve HTTP service: concurrent clients on loopback.

Closed loop: ``--concurrency`` client threads each submit a job, wait for it to end, then submit
the next, until ``--requests`` jobs are done. A fraction ``--duplicate-ratio`` of the jobs repeats
an earlier job's (video, prompt, seed) so it can be served from the result cache; the others get
a prompt from a list and a seed of their own. A duplicate repeats a job submitted at least
``concurrency`` jobs earlier where one exists, so that the original has most likely finished (a
repeat of a job still running is a cache miss; the measured hit rate says what really happened).

Without ``--url`` the tool starts its own server in this process (the demo engine unless
``--model-dir`` is given) on a free loopback port with ``--max-batch-size``, ``--max-wait-ms`` and
``--cache``; the clients then share the process (and the GIL) with the server, which is fine for
comparing settings but is not a substitute for a remote client. Each measured run gets a fresh
server (fresh caches and metrics) that reuses one loaded engine.

Reported: throughput (jobs/s and seconds of audio per second of wall time), end-to-end latency
p50/p95 as the client sees it (upload to final status, including any 429 back-off), overall and
separately for cache hits and misses, the cache hit rate, and the denoising batch-size histogram
scraped from ``/metrics`` (``foleyserve_batch_size``; from the job bodies' ``batch_size`` if the
metrics are not readable). A full queue (429) is honoured: the client sleeps ``Retry-After`` and
resubmits; the number of 429s is reported.

    python bench/load.py                                   # in-process demo server, 4 clients, 24 jobs
    python bench/load.py --concurrency 16 --requests 64 --duplicate-ratio 0.3 --max-batch-size 8
    python bench/load.py --url http://127.0.0.1:8000 --api-key KEY --steps 50 --json run.json
    python bench/load.py --sweep --requests 32 --json sweep.json   # concurrency 1/4/16 x duplicates 0/0.3

Before measuring, ``--warmup`` unique jobs run one at a time (not counted), so one-off start-up
costs stay out of the numbers; they also put the video's features into the feature cache, as on a
server that has seen the clip before. Seeds come from ``--plan-seed`` (random by default, and
recorded in the JSON), so repeated runs against a server with a persistent cache do not hit each
other's results unless you fix it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")
PROMPTS = (
    "footsteps on gravel",
    "a ball bouncing on a wooden floor",
    "rain on a tin roof",
    "a door creaks open",
    "glass breaking",
    "a dog barks twice",
    "typing on a keyboard",
    "waves crashing on rocks",
    "wind howling through trees",
    "a car engine starts",
    "crowd cheering loudly",
    "birds chirping in the forest",
)
SWEEP_CONCURRENCY = (1, 4, 16)
SWEEP_DUPLICATES = (0.0, 0.3)
MAX_RETRY_AFTER_S = 30.0


class LoadError(Exception):
    """A problem with the run's setup (bad flag, unreachable server): printed as one line."""


# ---------------------------------------------------------------------------------------------
# the workload


@dataclass
class Spec:
    index: int
    prompt: str
    seed: int
    duplicate_of: int | None = None  # index of the job this one repeats


def plan_workload(requests: int, duplicate_ratio: float, concurrency: int, rng: random.Random) -> list[Spec]:
    """``requests`` jobs of which round(ratio * requests) repeat an earlier unique job."""
    if requests < 1:
        raise LoadError(f"--requests must be at least 1, got {requests}")
    if not 0.0 <= duplicate_ratio < 1.0:
        raise LoadError(f"--duplicate-ratio must be in [0, 1), got {duplicate_ratio}")
    n_dup = min(requests - 1, round(duplicate_ratio * requests))
    # Job 0 is always unique: a duplicate needs something earlier to repeat.
    dup_at = set(rng.sample(range(1, requests), n_dup)) if n_dup else set()
    specs: list[Spec] = []
    uniques: list[Spec] = []
    for i in range(requests):
        if i in dup_at:
            # Prefer an original far enough back that it has probably finished (closed loop).
            settled = [s for s in uniques if s.index <= i - concurrency] or uniques
            src = rng.choice(settled)
            specs.append(Spec(i, src.prompt, src.seed, duplicate_of=src.index))
        else:
            spec = Spec(i, PROMPTS[len(uniques) % len(PROMPTS)], rng.randrange(2**62))
            uniques.append(spec)
            specs.append(spec)
    return specs


# ---------------------------------------------------------------------------------------------
# one client request


@dataclass
class Outcome:
    index: int
    duplicate: bool
    status: str  # final job status, or "error" when the request itself failed
    latency_s: float | None = None  # client view: first upload attempt -> final status seen
    server_s: float | None = None  # server view: finished - created
    cache_hit: bool = False
    audio_seconds: float = 0.0
    batch_size: int | None = None
    retries_429: int = 0
    error: str | None = None
    job_id: str | None = None


def retry_after_seconds(response: httpx.Response, default: float = 1.0) -> float:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return default
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:  # the HTTP-date form
        return min(MAX_RETRY_AFTER_S, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return default


def describe_error(response: httpx.Response) -> str:
    try:
        err = response.json().get("error") or {}
        return f"HTTP {response.status_code} {err.get('code', '')}: {err.get('message', '')}".strip()
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


@dataclass
class ClientOptions:
    base: str
    video: bytes
    video_name: str
    steps: int
    guidance: float
    output: str
    wait_s: float  # ?wait= long poll on submit; polling covers servers that answer early
    poll_s: float
    timeout_s: float  # per job, back-off included
    headers: dict[str, str] = field(default_factory=dict)


def run_job(client: httpx.Client, spec: Spec, opt: ClientOptions) -> Outcome:
    out = Outcome(index=spec.index, duplicate=spec.duplicate_of is not None, status="error")
    start = time.perf_counter()
    deadline = start + opt.timeout_s
    data = {
        "prompt": spec.prompt, "negative_prompt": "noisy, harsh", "steps": str(opt.steps),
        "guidance": str(opt.guidance), "seed": str(spec.seed), "output": opt.output,
    }
    while True:
        try:
            r = client.post(
                f"{opt.base}/v1/generations",
                params={"wait": opt.wait_s} if opt.wait_s > 0 else None,
                files={"video": (opt.video_name, opt.video, "video/mp4")},
                data=data,
                timeout=opt.wait_s + 60.0,
            )
        except httpx.HTTPError as e:
            out.error = f"transport: {type(e).__name__}: {e}"
            return out
        # 429: queue full; 503 with Retry-After: model still loading. Both say when to come back.
        if r.status_code == 429 or (r.status_code == 503 and "Retry-After" in r.headers):
            if r.status_code == 429:
                out.retries_429 += 1
            pause = retry_after_seconds(r) * random.uniform(0.8, 1.2)  # jitter: clients do not return in lockstep
            if time.perf_counter() + pause > deadline:
                out.error = f"gave up after {out.retries_429} queue-full answers: {describe_error(r)}"
                return out
            time.sleep(pause)
            continue
        break
    if r.status_code not in (200, 202):
        out.error = describe_error(r)
        return out
    body = r.json()
    out.job_id = body.get("id")
    while body.get("status") not in FINAL:
        if time.perf_counter() > deadline:
            out.error = f"job {out.job_id} did not finish within {opt.timeout_s:.0f} s (last status {body.get('status')})"
            return out
        time.sleep(opt.poll_s)
        try:
            g = client.get(f"{opt.base}/v1/generations/{out.job_id}", timeout=30.0)
        except httpx.HTTPError as e:
            out.error = f"transport while polling: {type(e).__name__}: {e}"
            return out
        if g.status_code != 200:
            out.error = describe_error(g)
            return out
        body = g.json()
    out.latency_s = time.perf_counter() - start
    out.status = body["status"]
    out.cache_hit = bool(body.get("cache_hit"))
    out.audio_seconds = float(body.get("duration") or 0.0)
    out.batch_size = body.get("batch_size")
    if body.get("finished") and body.get("created"):
        out.server_s = float(body["finished"]) - float(body["created"])
    if out.status == "failed":
        err = body.get("error") or {}
        out.error = f"job failed: {err.get('code')}: {err.get('message')}"
    return out


def run_clients(specs: list[Spec], concurrency: int, opt: ClientOptions) -> tuple[list[Outcome], float]:
    """Closed loop over ``specs`` with ``concurrency`` threads; returns outcomes and wall seconds."""
    results: list[Outcome | None] = [None] * len(specs)
    lock = threading.Lock()
    next_index = iter(range(len(specs)))
    gate = threading.Barrier(concurrency + 1)

    def worker() -> None:
        with httpx.Client(headers=opt.headers) as client:
            gate.wait()
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    results[i] = run_job(client, specs[i], opt)
                except Exception as e:  # one broken answer must not stop the run
                    results[i] = Outcome(index=i, duplicate=specs[i].duplicate_of is not None, status="error",
                                         error=f"client error: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


# ---------------------------------------------------------------------------------------------
# metrics scraping


@dataclass
class Scrape:
    batch_buckets: dict[float, float]  # le -> cumulative count
    cache: dict[str, dict[str, float]]  # level -> {"hits", "misses"}


def scrape(client: httpx.Client, base: str) -> Scrape | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = client.get(f"{base}/metrics", timeout=30.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    buckets: dict[float, float] = {}
    cache: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "foleyserve_batch_size_bucket":
                buckets[float(s.labels["le"])] = s.value
            elif s.name in ("foleyserve_cache_hits_total", "foleyserve_cache_misses_total"):
                kind = "hits" if "hits" in s.name else "misses"
                cache.setdefault(s.labels.get("level", "?"), {})[kind] = s.value
    return Scrape(buckets, cache)


def batch_histogram(before: Scrape | None, after: Scrape | None) -> dict[str, int] | None:
    """Batches per size range during the run, from the difference of two cumulative histograms."""
    if after is None or not after.batch_buckets:
        return None
    prev_le, prev_cum = 0.0, 0.0
    hist: dict[str, int] = {}
    for le in sorted(after.batch_buckets):
        cum = after.batch_buckets[le] - (before.batch_buckets.get(le, 0.0) if before else 0.0)
        n = round(cum - prev_cum)
        if n:
            if math.isinf(le):
                label = f">{prev_le:g}"
            elif le - prev_le <= 1:
                label = f"{le:g}"
            else:
                label = f"{prev_le + 1:g}-{le:g}"
            hist[label] = n
        prev_le, prev_cum = le, cum
    return hist


def cache_levels(before: Scrape | None, after: Scrape | None) -> dict[str, dict[str, int]]:
    if after is None:
        return {}
    out = {}
    for level, v in after.cache.items():
        b = before.cache.get(level, {}) if before else {}
        out[level] = {k: round(v.get(k, 0.0) - b.get(k, 0.0)) for k in ("hits", "misses")}
    return out


def batch_histogram_from_jobs(outcomes: list[Outcome]) -> dict[str, int] | None:
    # A batch of n jobs shows up as n jobs with batch_size n.
    sizes = Counter(o.batch_size for o in outcomes if o.status == "succeeded" and not o.cache_hit and o.batch_size)
    if not sizes:
        return None
    return {str(n): max(1, round(count / n)) for n, count in sorted(sizes.items())}


# ---------------------------------------------------------------------------------------------
# summary


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "mean": sum(values) / len(values) if values else None,
        "max": max(values) if values else None,
    }


def summarise(
    outcomes: list[Outcome], wall: float, config: dict[str, Any], before: Scrape | None, after: Scrape | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == "succeeded"]
    hits = [o for o in ok if o.cache_hit]
    misses = [o for o in ok if not o.cache_hit]
    batches = batch_histogram(before, after)
    source = "metrics"
    if batches is None:
        batches, source = batch_histogram_from_jobs(outcomes), "job bodies"
    audio = sum(o.audio_seconds for o in ok)
    n_batches = sum(batches.values()) if batches else 0
    return {
        "config": config,
        "wall_s": wall,
        "jobs": len(outcomes),
        "succeeded": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "throughput_jobs_per_s": len(ok) / wall if wall > 0 else None,
        "audio_seconds_total": audio,
        "audio_seconds_per_s": audio / wall if wall > 0 else None,
        "latency_s": {
            "all": latency_stats([o.latency_s for o in ok if o.latency_s is not None]),
            "cache_hit": latency_stats([o.latency_s for o in hits if o.latency_s is not None]),
            "cache_miss": latency_stats([o.latency_s for o in misses if o.latency_s is not None]),
        },
        "server_latency_s": latency_stats([o.server_s for o in ok if o.server_s is not None]),
        "duplicates_planned": sum(o.duplicate for o in outcomes),
        "cache_hit_rate": len(hits) / len(ok) if ok else None,
        "cache_levels": cache_levels(before, after),
        "batch_sizes": {"source": source, "batches": batches or {},
                        "jobs_per_batch": len(misses) / n_batches if n_batches else None},
        "http_429": sum(o.retries_429 for o in outcomes),
        "outcomes": [asdict(o) for o in outcomes],
    }


TABLE_HEADER = (
    "| server | clients | jobs | dup ratio | steps | jobs/s | audio s/s | p50 s | p95 s | hit p50 s | hit p95 s "
    "| hit rate | batches (size: count) | 429s | failed |"
)
TABLE_RULE = "|" + "---|" * 15


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_row(s: dict[str, Any]) -> str:
    c = s["config"]
    lat, hit = s["latency_s"]["all"], s["latency_s"]["cache_hit"]
    batches = s["batch_sizes"]["batches"]
    hist = ", ".join(f"{k}: {v}" for k, v in batches.items()) or "–"
    rate = "–" if s["cache_hit_rate"] is None else f"{100 * s['cache_hit_rate']:.0f}%"
    cells = [
        c["server_label"], str(c["concurrency"]), str(c["requests"]), f"{c['duplicate_ratio']:g}", str(c["steps"]),
        _f(s["throughput_jobs_per_s"]), _f(s["audio_seconds_per_s"]), _f(lat["p50"]), _f(lat["p95"]),
        _f(hit["p50"]), _f(hit["p95"]), rate, hist, str(s["http_429"]), str(s["failed"]),
    ]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------
# the in-process server


class InProcessServer:
    """The real app under uvicorn in a thread, on a socket bound before the thread starts."""

    def __init__(self, engine: Any, args: argparse.Namespace) -> None:
        import uvicorn

        from foleyserve.server.app import create_app
        from foleyserve.server.settings import ServerConfig

        self.data_dir = Path(tempfile.mkdtemp(prefix="foleyserve-load-"))
        config = ServerConfig(
            data_dir=self.data_dir, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue, cache=args.cache, log_level="warning",
        ).validate()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(config, engine=engine)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def load_engine(args: argparse.Namespace) -> Any:
    from foleyserve.config import ConfigError, EngineConfig
    from foleyserve.pipeline.pipeline import Engine

    if args.model_dir is None:
        return Engine.demo()
    try:
        cfg = EngineConfig(model_dir=args.model_dir, model=args.model, precision=args.precision, device=args.device).validate()
        return Engine.from_config(cfg)
    except (ConfigError, OSError, ValueError) as e:
        raise LoadError(f"cannot load the model from {args.model_dir}: {e}") from None


def wait_ready(base: str, headers: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/readyz", headers=headers, timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    raise LoadError(f"{base}/readyz did not answer 200 within {timeout:.0f} s (last: {last}); is the server running?")


# ---------------------------------------------------------------------------------------------
# runs


def one_run(args: argparse.Namespace, concurrency: int, duplicate_ratio: float, engine: Any | None) -> dict[str, Any]:
    server = InProcessServer(engine, args) if args.url is None else None
    base = server.url if server else args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        wait_ready(base, headers, args.ready_timeout)
        plan_seed = args.plan_seed if args.plan_seed is not None else random.SystemRandom().randrange(2**32)
        # Each cell of a sweep gets its own seeds, so against a shared server no cell hits another's results.
        rng = random.Random(f"{plan_seed}/{concurrency}/{duplicate_ratio:g}")
        specs = plan_workload(args.requests, duplicate_ratio, concurrency, rng)
        opt = ClientOptions(
            base=base, video=args.video.read_bytes(), video_name=args.video.name, steps=args.steps,
            guidance=args.guidance, output=args.output, wait_s=args.wait, poll_s=args.poll_ms / 1000.0,
            timeout_s=args.job_timeout, headers=headers,
        )
        with httpx.Client(headers=headers) as client:
            for k in range(args.warmup):
                warm = run_job(client, Spec(-1 - k, f"warm-up {k}", rng.randrange(2**62)), opt)
                if warm.status != "succeeded":
                    raise LoadError(f"the warm-up job did not succeed: {warm.error or warm.status}")
            before = scrape(client, base)
            outcomes, wall = run_clients(specs, concurrency, opt)
            after = scrape(client, base)
    finally:
        if server:
            server.stop()
    label = (
        f"in-process {'demo' if args.model_dir is None else args.model} b{args.max_batch_size} "
        f"w{args.max_wait_ms:g}ms cache={args.cache}" if server else base
    )
    config = {
        "server_label": label, "url": args.url, "concurrency": concurrency, "requests": args.requests,
        "duplicate_ratio": duplicate_ratio, "steps": args.steps, "guidance": args.guidance, "output": args.output,
        "video": str(args.video), "plan_seed": plan_seed, "warmup": args.warmup,
        "max_batch_size": args.max_batch_size if server else None,
        "max_wait_ms": args.max_wait_ms if server else None,
        "cache": args.cache if server else None,
    }
    return summarise(outcomes, wall, config, before, after)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    env["httpx"] = httpx.__version__
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start an in-process server)")
    ap.add_argument("--api-key", default=os.environ.get("FOLEYSERVE_API_KEY"), help="Bearer key (default: $FOLEYSERVE_API_KEY)")
    ap.add_argument("--video", type=Path, help="the clip every job uploads (default: the bundled 4 s sample)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--requests", type=int, default=24, help="measured jobs per run (default 24)")
    ap.add_argument("--duplicate-ratio", type=float, default=0.0, help="fraction of jobs that repeat an earlier one (default 0)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per job (default 10)")
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--output", default="wav", choices=("wav", "flac", "mp4"), help="result format (default wav)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured jobs run first, one at a time (default 1)")
    ap.add_argument("--plan-seed", type=int, help="seed of the workload plan (default: random)")
    ap.add_argument("--wait", type=float, default=120.0, help="?wait= seconds on submit, 0 to poll only (default 120)")
    ap.add_argument("--poll-ms", type=float, default=100.0, help="poll interval when a job is still running (default 100)")
    ap.add_argument("--job-timeout", type=float, default=900.0, help="give up on a job after this many seconds (default 900)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="wait this long for /readyz (default 300)")
    ap.add_argument("--sweep", action="store_true", help="run concurrency 1/4/16 x duplicate ratio 0/0.3")
    ap.add_argument("--json", type=Path, help="write the results here")
    srv = ap.add_argument_group("in-process server (ignored with --url)")
    srv.add_argument("--max-batch-size", type=int, default=4)
    srv.add_argument("--max-wait-ms", type=float, default=10.0)
    srv.add_argument("--max-queue", type=int, default=64)
    srv.add_argument("--cache", default="memory", help="off, memory, disk or redis://host:port/db (default memory)")
    srv.add_argument("--model-dir", type=Path, help="the official weights (default: the demo model)")
    srv.add_argument("--model", default="xxl", choices=("xxl", "xl"))
    srv.add_argument("--precision", default="bf16")
    srv.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    if args.concurrency < 1:
        ap.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 <= args.duplicate_ratio < 1.0:
        ap.error(f"--duplicate-ratio must be at least 0 and below 1, got {args.duplicate_ratio}")
    if args.requests < 1:
        ap.error(f"--requests must be at least 1, got {args.requests}")
    if args.warmup < 0:
        ap.error("--warmup cannot be negative")
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        ap.error(f"--url must start with http:// or https://, got {args.url!r}")
    if args.video is None:
        from foleyserve.pipeline.demo import sample_clip_path

        args.video = Path(sample_clip_path())
    elif not args.video.is_file():
        ap.error(f"--video {args.video} is not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = load_engine(args) if args.url is None else None
    cells = (
        [(c, d) for d in SWEEP_DUPLICATES for c in SWEEP_CONCURRENCY]
        if args.sweep
        else [(args.concurrency, args.duplicate_ratio)]
    )
    runs = []
    for concurrency, dup in cells:
        if args.requests < concurrency:
            print(f"note: {args.requests} jobs for {concurrency} clients: only {args.requests} clients are ever busy; "
                  f"raise --requests for a steady state", file=sys.stderr)
        summary = one_run(args, concurrency, dup, engine)
        if not runs:
            print(TABLE_HEADER)
            print(TABLE_RULE)
        runs.append(summary)
        print(table_row(summary), flush=True)
    problems = Counter()
    for s in runs:
        problems.update(s["errors"])
    for message, count in problems.most_common(5):
        print(f"  {count} x {message}", file=sys.stderr)
    if args.json:
        doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "environment": environment(), "runs": runs}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(s["failed"] == 0 for s in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
