"""Per-stage wall time and peak memory, so every run can say where its time and memory went."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch


# The key of the whole-run entry in StageTimer.as_dict(): shaped like a stage's entry (so code that
# prints every entry keeps working) but not a stage; code that adds up stages skips it.
OVERALL = "overall"


def _host_peak_bytes() -> int:
    # ru_maxrss is the process's high-water mark in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageRecord:
    seconds: float
    host_peak_bytes: int  # process high-water mark at the end of the stage (monotonic)
    device_peak_bytes: int | None  # peak accelerator memory during the stage, where measurable


@dataclass
class StageTimer:
    """Collects one :class:`StageRecord` per named stage; a repeated name accumulates time."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: dict[str, StageRecord] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            dev_peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
            prev = self.records.get(name)
            if prev is not None:
                elapsed += prev.seconds
                if dev_peak is not None and prev.device_peak_bytes is not None:
                    dev_peak = max(dev_peak, prev.device_peak_bytes)
            self.records[name] = StageRecord(elapsed, _host_peak_bytes(), dev_peak)

    def seconds(self) -> dict[str, float]:
        return {k: r.seconds for k, r in self.records.items()}

    def device_peak_bytes(self) -> int | None:
        """Peak device memory over the whole run: the largest stage peak (each stage resets the
        CUDA peak counter, so no single stage's figure is the run's). None without a device."""
        return overall_device_peak(r.device_peak_bytes for r in self.records.values())

    def host_peak_bytes(self) -> int:
        """The process's host high-water mark at the end of the last stage (0 before any stage)."""
        return max((r.host_peak_bytes for r in self.records.values()), default=0)

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        """Per stage ``{seconds, host_peak_bytes, device_peak_bytes}``, plus an :data:`OVERALL`
        entry of the same shape: the stages' summed seconds and the peaks over all stages."""
        out: dict[str, dict[str, float | int | None]] = {
            k: {"seconds": r.seconds, "host_peak_bytes": r.host_peak_bytes, "device_peak_bytes": r.device_peak_bytes}
            for k, r in self.records.items()
        }
        if self.records:
            out[OVERALL] = {
                "seconds": sum(r.seconds for r in self.records.values()),
                "host_peak_bytes": self.host_peak_bytes(),
                "device_peak_bytes": self.device_peak_bytes(),
            }
        return out


def overall_device_peak(peaks: Iterable[int | None]) -> int | None:
    """The largest of per-stage device peaks, ignoring unmeasured (None) ones; None if all are."""
    known = [p for p in peaks if p is not None]
    return max(known) if known else None


def split_overall(memory: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """``(stages, overall)`` of an :meth:`StageTimer.as_dict` result (overall None if absent)."""
    stages = {k: v for k, v in memory.items() if k != OVERALL}
    return stages, memory.get(OVERALL)
