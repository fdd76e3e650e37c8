"""What the batcher hands out: its options, its refusal, and the job it tracks."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from foleyserve.config import ConfigError
from foleyserve.pipeline.pipeline import PreparedJob
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from foleyserve.runtime.buckets import _Trim

JobStatus = Literal["queued", "preparing", "running", "succeeded", "failed", "cancelled"]
PRIORITIES = ("interactive", "bulk")
LENGTH_BUCKETS = ("exact", "second")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class QueueFull(Exception):
    """The batcher cannot take another job now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BatcherConfig:
    max_batch_size: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 64
    length_bucket: str = "exact"

    def validate(self) -> "BatcherConfig":
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms < math.inf:
            raise ConfigError(f"max_wait_ms must be a number of milliseconds >= 0, got {self.max_wait_ms!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ConfigError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        if self.length_bucket not in LENGTH_BUCKETS:
            raise ConfigError(f"unknown length_bucket {self.length_bucket!r}: choose one of {', '.join(LENGTH_BUCKETS)}")
        return self


@dataclass(eq=False)
class Job:
    """One request's life in the batcher. Read it freely; only the batcher writes it."""

    id: str
    request: GenerationRequest
    priority: str = "interactive"
    status: JobStatus = "queued"
    progress: tuple[int, int] = (0, 0)  # (step, total) of denoising
    cache_hit: bool = False
    result: GenerationResult | None = None
    error: Exception | None = None
    error_code: str | None = None
    created: float = field(default_factory=time.time)  # wall-clock seconds (time.time)
    started: float | None = None  # when its denoising batch started
    finished: float | None = None
    batch_size: int | None = None
    # Several samples of one request (runtime/samples.py): their seeds, then their results in seed
    # order (``result`` is the first). None for a one-sample job.
    seeds: tuple[int, ...] | None = None
    results: list[GenerationResult] | None = None
    # best_of: the measures to rank the samples by, then the ranking (bestof.Ranking.as_dict();
    # ``result`` is then the kept sample, not the first).
    rank: tuple[str, ...] | None = None
    ranking: dict | None = None

    _seq: int = field(default=0, init=False, repr=False)
    _submitted: float = field(default_factory=time.monotonic, init=False, repr=False)
    _ready_at: float = field(default=0.0, init=False, repr=False)
    _prepared: PreparedJob | None = field(default=None, init=False, repr=False)
    _key: tuple | None = field(default=None, init=False, repr=False)
    _result_key: str | None = field(default=None, init=False, repr=False)
    _source_key: str | None = field(default=None, init=False, repr=False)  # hash of the upload, hashed once
    _trim: "_Trim | None" = field(default=None, init=False, repr=False)
    _cancel: bool = field(default=False, init=False, repr=False)
    _in_queue: bool = field(default=False, init=False, repr=False)  # counted by queue_depth
    _done: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is succeeded, failed or cancelled; False if ``timeout`` ran out first."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES
