"""Per-stage wall time and peak memory, so every run can say where its time and memory went."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch


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

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {
            k: {"seconds": r.seconds, "host_peak_bytes": r.host_peak_bytes, "device_peak_bytes": r.device_peak_bytes}
            for k, r in self.records.items()
        }
