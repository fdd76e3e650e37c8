"""Prometheus metrics of one server app.

Each app owns its registry (tests and embedding programs create many apps in one process; the
global default registry would refuse the second set of names). Values that live elsewhere (queue
depth, cache counters, memory) are read at scrape time by a custom collector instead of being
copied into gauges on every change.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("foleyserve.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass
class LiveSources:
    """Callables the collector asks at scrape time; each may return None when not available yet."""

    queue_depth: Callable[[], int | None]
    cache_stats: Callable[[], dict[str, dict[str, int]] | None]
    ready: Callable[[], bool]
    engine_info: Callable[[], dict[str, str] | None]


class ServerMetrics:
    def __init__(self, sources: LiveSources) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "foleyserve_requests", "Generation requests by outcome: succeeded, failed, cancelled, or rejected at submission",
            ["status"], registry=r,
        )
        self.stage_seconds = Histogram(
            "foleyserve_stage_seconds", "Seconds per pipeline stage of each finished job (from its timings)",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.request_seconds = Histogram(
            "foleyserve_request_seconds", "End to end: upload accepted to result written, per finished job",
            ["status"], buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "foleyserve_queue_wait_seconds", "Seconds a job waited in the queue before it started",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "foleyserve_batch_size", "Jobs per batched denoising loop", buckets=_BATCH_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "foleyserve_batch_stage_seconds", "Seconds per stage of each batched denoising loop (shared by its jobs)",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.audio_seconds = Counter(
            "foleyserve_audio_seconds", "Seconds of audio delivered (divide cost by this / 60 for cost per audio minute)",
            registry=r,
        )
        self.upload_bytes = Counter("foleyserve_upload_bytes", "Bytes of accepted video uploads", registry=r)
        r.register(_LiveCollector(sources))

    def observe_finished(
        self, status: str, *, timings: dict[str, float], seconds: float | None, audio_seconds: float | None
    ) -> None:
        self.requests.labels(status=status).inc()
        if status == "succeeded":
            for stage, s in timings.items():
                self.stage_seconds.labels(stage=stage).observe(max(float(s), 0.0))
            if audio_seconds:
                self.audio_seconds.inc(audio_seconds)
        if seconds is not None:
            self.request_seconds.labels(status=status).observe(max(seconds, 0.0))

    def observe_batch(self, size: int, stages: dict[str, float]) -> None:
        self.batch_size.observe(size)
        for stage, s in stages.items():
            self.batch_seconds.labels(stage=stage).observe(max(float(s), 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, sources: LiveSources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        # Registering must not call the sources (the engine may not be loaded yet).
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        yield _gauge("foleyserve_ready", "1 once the model is loaded and jobs are accepted", 1.0 if s.ready() else 0.0)
        info = _safe(s.engine_info)
        if info:
            g = GaugeMetricFamily("foleyserve_engine_info", "The loaded model (value is always 1)", labels=sorted(info))
            g.add_metric([str(info[k]) for k in sorted(info)], 1.0)
            yield g
        depth = _safe(s.queue_depth)
        if depth is not None:
            yield _gauge("foleyserve_queue_depth", "Jobs waiting for a batch", float(depth))
        stats = _safe(s.cache_stats)
        if stats is not None:
            hits = CounterMetricFamily("foleyserve_cache_hits", "Cache hits by level (visual, text, result)", labels=["level"])
            misses = CounterMetricFamily("foleyserve_cache_misses", "Cache misses by level", labels=["level"])
            size = GaugeMetricFamily("foleyserve_cache_bytes", "Bytes held per cache level", labels=["level"])
            entries = GaugeMetricFamily("foleyserve_cache_entries", "Entries held per cache level", labels=["level"])
            for level, st in sorted(stats.items()):
                hits.add_metric([level], float(st.get("hits", 0)))
                misses.add_metric([level], float(st.get("misses", 0)))
                size.add_metric([level], float(st.get("bytes", 0)))
                entries.add_metric([level], float(st.get("entries", 0)))
            yield from (hits, misses, size, entries)
        rss = host_rss_bytes()
        if rss is not None:
            yield _gauge("foleyserve_host_rss_bytes", "Resident memory of the server process", float(rss))
        yield from _gpu_memory()


def _safe(source: Callable[[], Any]) -> Any:
    # A scrape must not fail because one source does (a cache backend that is down, say).
    try:
        return source()
    except Exception:
        log.warning("a metrics source failed; its series are left out of this scrape", exc_info=True)
        return None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def host_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or the platform refuses; the gauge is simply left out
        return None


def _gpu_memory() -> Iterator[Metric]:
    # Only when the engine already imported torch: a scrape must never pay for that import.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily("foleyserve_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"])
    reserved = GaugeMetricFamily("foleyserve_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator", labels=["device"])
    for i in range(torch.cuda.device_count()):
        dev = f"cuda:{i}"
        allocated.add_metric([dev], float(torch.cuda.memory_allocated(i)))
        reserved.add_metric([dev], float(torch.cuda.memory_reserved(i)))
    yield from (allocated, reserved)
