"""The dynamic batcher: many requests, one denoising loop per group of compatible jobs.

Pipeline. Two worker threads joined by queues, so the encoders of the next jobs run while the
denoiser works on the current batch:

* the *prepare* thread takes submitted jobs one at a time: decode -> (result cache: a hit writes
  the cached waveform and the job is done, no model runs) -> SigLIP2/Synchformer features (visual
  cache, keyed by the decoded frames) -> CLAP features (text cache) -> a ready
  :class:`~foleyserve.pipeline.pipeline.PreparedJob`. It stays at most ``2 * max_batch_size``
  ready jobs ahead of the denoiser, because every ready job holds its features in memory. The
  decoded frames themselves are dropped once encoded (only their duration is needed later).
* the *denoise* thread owns the DiT: it forms a batch from the ready jobs, runs ONE
  ``engine.sample_jobs`` for it, then ``engine.finish`` (DAC + write) per job.

Forming a batch. The denoiser takes the first ready job in priority order and gathers the ready
jobs with the same batch key: equal latent length, step count, guided-or-not (see
``PreparedJob.batch_key``) and equal SigLIP frame count (two clips can have equal latent lengths
but a different number of 8 fps frames, which cannot be stacked). It starts the batch once it has
``max_batch_size`` jobs, or once ``max_wait_ms`` has passed since the oldest of them became ready,
whichever comes first; until then a newly prepared job with the same key joins it.

Length buckets. The model has no attention mask over audio tokens, so only equal latent lengths can
share a loop.

* ``"exact"`` (default): every clip keeps its full length (up to the model's 15.04 s, the last
  partial second included), exactly what a solo run gives; clips batch only with clips of the same
  latent length, which in practice means clips of the same length to the frame.
* ``"second"``: every clip of at least one second is trimmed to whole seconds: a clip of duration
  D keeps the frames that a clip of exactly floor(D) seconds at 25 fps gets under the official
  sampling rule (25*N - 1 frames at 25 fps, 8*N at 8 fps, i.e. N - 0.04 s of audio). So clips of
  4.0, 4.3 and 4.7 s all land in the 4 s bucket and can share a loop, and a clip that already has
  exactly that length is not changed at all. The trim is reported in ``result.warnings`` (the
  audio ends before the video does; an mp4 output is silent for the rest). Clips under one second,
  and the rare clip whose frames stop short of its bucket, keep their own length.

Long requests. A video over 15 s, or a ``start``/``duration`` range, is ONE job with a batch key of
its own (:class:`~foleyserve.pipeline.longform.LongformJob`): the prepare thread decodes and
encodes all its windows, and the denoise thread runs them, batched inside the job, as one batch
of the queue; ``progress`` counts the steps of all its window loops. It is not cached.

Several samples. ``submit(..., seeds=[...])`` is likewise one job with a key of its own
(:mod:`foleyserve.runtime.samples`): prepared once, every seed a row of one loop, ``job.results``
in seed order. Its features are cached; its results are not looked up in the result cache.

Text to audio. A request without a video has a frame-less stand-in clip of ``duration`` seconds
(:mod:`foleyserve.pipeline.textonly`), cached under its length; it is never trimmed to a bucket.

Priorities. ``"interactive"`` jobs are always prepared and denoised before ``"bulk"`` ones; within
a priority, first in first out. So that a steady interactive load cannot starve bulk work forever, a
bulk job that has waited more than :data:`BULK_PROMOTION_SECONDS` (30 s) counts as interactive
(and, being older, goes ahead of newer interactive jobs).

Statuses. ``queued`` (waiting for the prepare thread), ``preparing`` (decoding and encoding, or
prepared and waiting for the denoiser), ``running`` (in a denoising batch), then ``succeeded``,
``failed`` or ``cancelled``.

Queue limit. ``submit`` raises :class:`QueueFull` when the jobs not yet denoising (waiting,
preparing, or prepared) would exceed ``max_queue``. Its ``retry_after`` comes from the measured
drain rate (jobs per second recently leaving the queue) and from the refusals already promised a
slot: the k-th client refused while k - 1 earlier promises are still pending is told k / rate, so
refused clients come back spread out instead of all at once (1 s at least, 300 s at most).

Cancellation. A job that is waiting or preparing is cancelled at once. A running job leaves its
batch at the next denoising step (``keep_rows``); the other rows of the batch go on unchanged,
because every row has its own noise and conditioning. A cancellation that arrives while the job's
audio is already being decoded discards the result and deletes the file written for it.

Errors. A job fails alone with ``error_code``: ``"invalid_video"`` (the video cannot be decoded),
``"video_too_short"`` (under 16 frames at 25 fps), ``"invalid_request"`` (bad parameters, a prompt
too long for CLAP) or ``"internal"`` (anything unexpected: logged with its traceback; the job
keeps only the message). An exception in a batch's denoising loop fails that batch's jobs; a
failure in one job's DAC decode or write fails that job only. The worker threads keep running.

Caching (``cache`` is optional; ``None`` or a disabled cache means no caching). With a cache the
prompts are normalised (:func:`foleyserve.runtime.cache.normalise_prompt`) before CLAP runs, so
that the features stored under a normalised key are the features of that key whichever spelling
arrived first. The result key includes the engine's step-cache threshold when the step cache is on,
because that changes the numbers.

Finished jobs stay readable through :meth:`Batcher.get` until :data:`KEEP_FINISHED` newer jobs
have finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Callable

from foleyserve import media
from foleyserve.models.encoders import PromptTooLongError
from foleyserve.pipeline import longform, textonly
from foleyserve.pipeline.pipeline import Engine, PreparedJob
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.stages import StageTimer
# The batcher's public types live beside it; importing them from here keeps working.
from foleyserve.runtime.batch_job import (  # noqa: F401
    FINAL_STATUSES, LENGTH_BUCKETS, PRIORITIES, BatcherConfig, Job, JobStatus, QueueFull,
)
from foleyserve.runtime import samples
from foleyserve.runtime.buckets import _Trim, trim_to_whole_seconds  # noqa: F401
from foleyserve.runtime.fastpath import _SOURCE_MEMO, ResultFastPath  # noqa: F401

if TYPE_CHECKING:
    from foleyserve.runtime.cache import FoleyCache

log = logging.getLogger("foleyserve.batcher")


# A bulk job older than this is scheduled as if it were interactive.
BULK_PROMOTION_SECONDS = 30.0
# Finished jobs kept for get(); older ones are forgotten, because each keeps its result's
# waveform (up to 15 s at 48 kHz, about 3 MB).
KEEP_FINISHED = 256
# Prepared jobs allowed to wait for the denoiser, per max_batch_size.
READY_BATCHES_AHEAD = 2
# Until two jobs have left the queue there is no drain rate: the first refused client is told
# this, each later one a second more (enough to spread them; the rate is known within a batch).
DEFAULT_RETRY_AFTER = 2.0
MAX_RETRY_AFTER = 300.0
# Leaves older than this do not count towards the drain rate.
DRAIN_WINDOW_S = 120.0
# Completions remembered for the throughput estimate.
_THROUGHPUT_WINDOW = 64



def _classify(exc: BaseException, *, user_stage: bool) -> tuple[str, Exception]:
    """(error_code, the exception a job carries). Only the prepare stage sees user mistakes;
    anything else is ours and is logged with its traceback."""
    if user_stage and isinstance(exc, media.MediaError):
        code = "video_too_short" if str(exc).startswith("video too short") else "invalid_video"
        return code, exc.with_traceback(None)
    if user_stage and isinstance(exc, (RequestError, PromptTooLongError)):
        return "invalid_request", exc.with_traceback(None)
    log.error("job failed with an unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    # A fresh exception: the job must not keep the traceback (and through it frames and tensors) alive.
    if isinstance(exc, OSError) and exc.errno is not None:
        # Keep the errno: the service tells a full or read-only disk from a bug by it.
        return "internal", OSError(exc.errno, f"internal error ({type(exc).__name__}: {exc}); the job failed, other jobs are unaffected")
    return "internal", RuntimeError(f"internal error ({type(exc).__name__}: {exc}); the job failed, other jobs are unaffected")


class Batcher(ResultFastPath):
    """Queue, prepare and batch-denoise generation jobs on one engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        config: BatcherConfig | None = None,
        cache: "FoleyCache | None" = None,
        on_update: Callable[[Job], None] | None = None,
        on_batch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.config = (config or BatcherConfig()).validate()
        self.cache = cache
        self.on_update = on_update
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._pending: list[Job] = []  # waiting for the prepare thread
        self._preparing: Job | None = None
        self._ready: list[Job] = []  # prepared, waiting for the denoiser
        self._finished: deque[str] = deque()
        self._completions: deque[float] = deque(maxlen=_THROUGHPUT_WINDOW)
        self._batch_sizes: deque[int] = deque(maxlen=16)
        # Times jobs left the queue (into a batch, or ended while queued/preparing), and the
        # retry times promised to refused submitters: what retry_after is computed from.
        self._leaves: deque[float] = deque(maxlen=_THROUGHPUT_WINDOW)
        self._promised: deque[float] = deque()
        self._seq = itertools.count()
        # Source bytes -> (frames key, frame-less decoded video, trim) of videos prepared before, so a
        # repeated upload finds its cached result without decoding (see _fast_hit). Per process.
        self._sources: OrderedDict[str, tuple[str, media.DecodedVideo, _Trim | None]] = OrderedDict()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("this batcher was stopped; create a new one")
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._prepare_loop, name="foleyserve-prepare", daemon=True),
                threading.Thread(target=self._denoise_loop, name="foleyserve-denoise", daemon=True),
            ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the ones not yet denoising, let the running batch finish (up to
        ``timeout`` seconds) and end the worker threads."""
        with self._cond:
            self._stopping = True
            waiting = [*self._pending, *self._ready]
            if self._preparing is not None:
                waiting.append(self._preparing)
            self._pending.clear()
            self._ready.clear()
            changed = [j for j in waiting if self._finalize_locked(j, "cancelled", error_code="shutdown")]
            self._cond.notify_all()
        for j in changed:
            self._emit(j)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("batcher workers still busy after %.1f s; leaving them to finish in the background", timeout)

    def __enter__(self) -> "Batcher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the public API --------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, *, priority: str = "interactive", job_id: str | None = None,
        seeds: list[int] | None = None, rank: tuple[str, ...] | None = None,
    ) -> Job:
        """Queue a request; with ``seeds``, one sample per seed in one job (``request.seed`` is
        ignored; see :mod:`foleyserve.runtime.samples`), ranked by ``rank`` when given. Raises :class:`RequestError` for an invalid
        request and :class:`QueueFull` when the queue is at ``max_queue``."""
        request.validate()
        if priority not in PRIORITIES:
            raise RequestError(f"unknown priority {priority!r}: choose one of {', '.join(PRIORITIES)}")
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            samples.check(request, seeds)
        # A range's result is not the video's: only whole-video requests use the bytes-only path,
        # and only one-sample jobs use the result cache at all.
        whole = request.start == 0 and request.duration is None and seeds is None
        source_key = self._source_key(request.video) if self._use_cache() and whole else None
        fast = self._fast_hit(request, source_key)
        if fast is not None:
            return self._finish_fast(request, priority, job_id, *fast)
        with self._cond:
            if self._stopping:
                raise QueueFull("the batcher is shutting down and takes no new jobs", retry_after=self._retry_after_locked())
            if job_id is None:
                job_id = uuid.uuid4().hex
            elif job_id in self._jobs:
                raise RequestError(f"job id {job_id!r} is already in use; choose another or leave it out")
            depth = self._depth_locked()
            if depth + 1 > self.config.max_queue:
                wait = self._retry_after_locked()
                raise QueueFull(
                    f"the queue is full ({depth} jobs waiting, limit {self.config.max_queue}); retry in {wait:.0f} s",
                    retry_after=wait,
                )
            job = Job(id=job_id, request=request, priority=priority, progress=(0, request.steps),
                      seeds=tuple(seeds) if seeds is not None else None, rank=rank if seeds is not None else None)
            job._seq = next(self._seq)
            job._source_key = source_key
            self._jobs[job_id] = job
            job._in_queue = True
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a job. False if there is no such job or it has already ended."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return False
            job._cancel = True
            if job.status == "running":
                return True  # the denoise thread drops it at the next step
            if job in self._pending:
                self._pending.remove(job)
            if job in self._ready:
                self._ready.remove(job)
            self._finalize_locked(job, "cancelled")
            self._cond.notify_all()
        self._emit(job)
        return True

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def queue_depth(self) -> int:
        """Jobs not yet denoising: waiting, preparing or prepared."""
        with self._cond:
            return self._depth_locked()

    # -- shared state helpers (call with the lock held) ------------------------------------------

    def _depth_locked(self) -> int:
        preparing = 1 if self._preparing is not None and not self._preparing.done else 0
        return len(self._pending) + preparing + len(self._ready)

    def _leave_queue_locked(self, job: Job, now: float) -> None:
        if job._in_queue:
            job._in_queue = False
            self._leaves.append(now)

    def drain_rate(self) -> float | None:
        """Jobs per second recently leaving the queue (None until two have left)."""
        with self._cond:
            return self._drain_rate_locked(time.monotonic())

    def _drain_rate_locked(self, now: float) -> float | None:
        # Only recent leaves: after an idle hour, old ones would make a burst look slow to drain.
        recent = [t for t in self._leaves if now - t <= DRAIN_WINDOW_S]
        if len(recent) < 2:
            return None
        span = now - recent[0]
        return len(recent) / span if span > 0 else None

    def retry_after(self) -> float:
        """Seconds a refused submitter should wait, counted as a refusal (see the module docstring)."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        now = time.monotonic()
        while self._promised and self._promised[0] <= now:
            self._promised.popleft()
        rate = self._drain_rate_locked(now)
        position = len(self._promised) + 1
        wait = DEFAULT_RETRY_AFTER + (position - 1) if rate is None else position / rate
        wait = float(min(MAX_RETRY_AFTER, max(1.0, wait)))
        self._promised.append(now + wait)
        if len(self._promised) > 1 and self._promised[-1] < self._promised[-2]:
            self._promised = deque(sorted(self._promised))
        return wait

    def _order(self, now: float) -> Callable[[Job], tuple[int, int]]:
        def key(job: Job) -> tuple[int, int]:
            urgent = job.priority == "interactive" or now - job._submitted > BULK_PROMOTION_SECONDS
            return (0 if urgent else 1, job._seq)

        return key

    def _finalize_locked(
        self,
        job: Job,
        status: JobStatus,
        *,
        result: GenerationResult | None = None,
        error: Exception | None = None,
        error_code: str | None = None,
        ran: bool = False,
    ) -> bool:
        """Move a job to a final status; False (and nothing changes) if it already had one."""
        if job.done:
            return False
        job.status = status
        job.result = result
        job.error = error
        job.error_code = error_code
        job.finished = time.time()
        job._prepared = None  # features and latents are no longer needed
        if ran:
            self._completions.append(time.monotonic())
        self._leave_queue_locked(job, time.monotonic())
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)
        job._done.set()
        return True

    def _emit(self, job: Job) -> None:
        if self.on_update is None:
            return
        try:
            self.on_update(job)
        except Exception:
            log.exception("the batcher's on_update callback failed; the job goes on")

    def _end(self, job: Job, status: JobStatus, **kw) -> None:
        with self._cond:
            changed = self._finalize_locked(job, status, **kw)
            self._cond.notify_all()
        if changed:
            self._emit(job)

    def _fail(self, job: Job, exc: BaseException, *, user_stage: bool, ran: bool = False) -> None:
        code, error = _classify(exc, user_stage=user_stage)
        self._end(job, "failed", error=error, error_code=code, ran=ran)

    # -- prepare thread ------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        ahead = READY_BATCHES_AHEAD * self.config.max_batch_size
        while True:
            with self._cond:
                while not self._stopping and (not self._pending or len(self._ready) >= ahead):
                    self._cond.wait()
                if self._stopping:
                    return
                job = min(self._pending, key=self._order(time.monotonic()))
                self._pending.remove(job)
                self._preparing = job
                job.status = "preparing"
            self._emit(job)
            try:
                self._prepare(job)
            except Exception as e:
                self._fail(job, e, user_stage=True)
            finally:
                with self._cond:
                    self._preparing = None
                    self._cond.notify_all()

    def _use_cache(self) -> bool:
        return self.cache is not None and bool(self.cache.enabled)

    def _precision_id(self) -> str:
        step_cache = self.engine.step_cache
        return self.engine.precision if step_cache is None else f"{self.engine.precision}+stepcache={step_cache}"

    def _prepare(self, job: Job) -> None:
        engine, req = self.engine, job.request
        timer = StageTimer(engine.device)
        plan = longform.plan_for(req)
        if plan is not None:
            # Over 15 s, or a range: ONE job, its windows batched inside it (not cached).
            windowed = longform.prepare(engine, req, plan=plan, timer=timer, cancelled=lambda: job._cancel)
            self._make_ready(job, windowed, windowed.batch_key())
            return
        # Without a video, decode() makes a frame-less stand-in of req.duration seconds.
        decoded = engine.decode(req.video, timer, max_seconds=req.duration or media.MAX_SECONDS)
        if self.config.length_bucket == "second" and not isinstance(decoded, textonly.NoVideoClip):
            decoded, job._trim = trim_to_whole_seconds(decoded)
        if job._cancel:
            return
        prompt, negative = req.prompt, req.negative_prompt
        visual = text = None
        if self._use_cache():
            from foleyserve.runtime.cache import CachedResult, normalise_prompt, result_key, text_key

            assert self.cache is not None
            prompt, negative = normalise_prompt(prompt), normalise_prompt(negative)
            fkey = textonly.clip_key(decoded)  # a text-only clip has no frames to hash: its length
            self._remember_source(job._source_key, fkey, decoded, job._trim)
            if job.seeds is None:
                job._result_key = result_key(
                    fkey, prompt, negative, req.seed, req.steps, float(req.guidance), engine.components.name, self._precision_id()
                )
            hit = self.cache.get_result(job._result_key) if job._result_key is not None else None
            if isinstance(hit, CachedResult):
                try:
                    result = self._restore(job, engine.write_result(req, hit.waveform, decoded, timer))
                except Exception as e:  # writing the output is our side, not the user's video
                    self._fail(job, e, user_stage=False)
                    return
                with self._cond:
                    job.cache_hit = True
                    job.progress = (req.steps, req.steps)
                    job.started = time.time()
                self._end(job, "succeeded", result=result)
                return
            visual = self.cache.get_visual(fkey)
            if visual is None:
                visual = engine.encode_visual(decoded, timer)
                self.cache.put_visual(fkey, visual)
            tkey = text_key(prompt, negative)
            text = self.cache.get_text(tkey)
            if text is None:
                text = engine.extract_text(prompt, negative, timer)
                self.cache.put_text(tkey, text)
        else:
            visual = engine.encode_visual(decoded, timer)
            if job._cancel:
                return
            text = engine.extract_text(prompt, negative, timer)
        prepared = engine.prepare(req, decoded=decoded, visual=visual, text=text)
        prepared.timer = timer
        # The frames were only for the encoders; finish() needs just the duration.
        prepared.decoded = dataclasses.replace(decoded, frames={})
        if job.seeds is not None:
            many = samples.expand(prepared, list(job.seeds), rank=job.rank)
            self._make_ready(job, many, many.batch_key())
            return
        self._make_ready(job, prepared, (*prepared.batch_key(), int(visual.siglip.shape[1])))

    def _make_ready(self, job: Job, prepared: "PreparedJob | longform.LongformJob | samples.SamplesJob", key: tuple) -> None:
        with self._cond:
            if job.done:
                return
            job._prepared = prepared  # type: ignore[assignment]
            job._key = key
            job._ready_at = time.monotonic()
            self._ready.append(job)
            self._cond.notify_all()

    def _restore(self, job: Job, result: GenerationResult) -> GenerationResult:
        """Undo the "second" bucket's duration change in a result and say what was trimmed."""
        if job._trim is not None:
            result.video_seconds = job._trim.video_seconds
            result.warnings.append(job._trim.warning)
        return result

    # -- denoise thread ------------------------------------------------------------------------

    def _denoise_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception as e:  # a bug in our own bookkeeping: fail the batch, keep serving
                code, error = _classify(e, user_stage=False)
                for job in batch:
                    self._end(job, "failed", error=error, error_code=code)

    def _next_batch(self) -> list[Job] | None:
        size, max_wait = self.config.max_batch_size, self.config.max_wait_ms / 1000.0
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if not self._ready:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                ordered = sorted(self._ready, key=self._order(now))
                head = ordered[0]
                group = [j for j in ordered if j._key == head._key][:size]
                deadline = min(j._ready_at for j in group) + max_wait
                if len(group) < size and now < deadline:
                    self._cond.wait(deadline - now)
                    continue
                started = time.time()
                for j in group:
                    self._ready.remove(j)
                    self._leave_queue_locked(j, now)
                    j.status = "running"
                    j.started = started
                    j.batch_size = len(group)
                    j.progress = (0, j.request.steps)
                self._batch_sizes.append(len(group))
                self._cond.notify_all()  # the prepare thread may refill
                break
        for j in group:
            self._emit(j)
        return group

    def _run_batch(self, batch: list[Job]) -> None:
        def keep_rows() -> list[bool]:
            with self._cond:
                keep = [not j._cancel for j in batch]
                dropped = [j for j in batch if j._cancel and self._finalize_locked(j, "cancelled")]
            for j in dropped:
                self._emit(j)
            return keep

        def progress(stage: str, done: int, total: int) -> None:
            if stage != "denoise":
                return
            with self._cond:
                live = [j for j in batch if not j.done]
                for j in live:
                    j.progress = (done, total)
            for j in live:
                self._emit(j)

        prepared = [j._prepared for j in batch]
        assert all(p is not None for p in prepared)
        try:
            if longform.is_longform(prepared[0]):  # alone in its batch (a key of its own)
                latents = [longform.sample(self.engine, prepared[0], progress=progress, keep_rows=keep_rows)]  # type: ignore[arg-type]
            elif samples.is_samples(prepared[0]):  # likewise
                latents = [samples.sample(self.engine, prepared[0], progress=progress, keep_rows=keep_rows)]  # type: ignore[arg-type]
            else:
                latents = self.engine.sample_jobs(prepared, progress=progress, keep_rows=keep_rows)  # type: ignore[arg-type]
        except Exception as e:
            code, error = _classify(e, user_stage=False)  # logged once for the whole batch
            for job in batch:
                self._end(job, "failed", error=error, error_code=code, ran=True)
            return
        stages = {"dit": prepared[0].timer.records["dit"].seconds if "dit" in prepared[0].timer.records else 0.0}
        for job, prep, lat in zip(batch, prepared, latents):
            if job._cancel:
                self._end(job, "cancelled")
                continue
            try:
                if longform.is_longform(prep):
                    result = longform.finish(self.engine, prep, lat)  # type: ignore[arg-type]
                elif samples.is_samples(prep):
                    job.results = samples.finish(self.engine, prep, lat)  # type: ignore[arg-type]
                    job.ranking, result = prep.ranking, job.results[prep.best]  # type: ignore[union-attr]
                else:
                    result = self._restore(job, self.engine.finish(prep, lat))  # type: ignore[arg-type]
            except Exception as e:
                self._fail(job, e, user_stage=False, ran=True)
                continue
            for name in ("dac", "write"):
                if name in prep.timer.records:  # type: ignore[union-attr]
                    stages[name] = stages.get(name, 0.0) + prep.timer.records[name].seconds  # type: ignore[union-attr]
            if job._cancel:
                # Cancelled while its audio was being decoded: the caller no longer wants the files.
                samples.discard(job.results or [result])
                self._end(job, "cancelled")
                continue
            if self._use_cache() and job._result_key is not None:
                from foleyserve.runtime.cache import CachedResult

                assert self.cache is not None
                meta = {
                    "seed": result.seed,
                    "model": result.model,
                    "precision": self._precision_id(),
                    "audio_seconds": result.audio_seconds,
                    "timings": result.timings,
                }
                self.cache.put_result(job._result_key, CachedResult(waveform=result.waveform, sample_rate=result.sample_rate, meta=meta))
            self._end(job, "succeeded", result=result, ran=True)
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), stages)
            except Exception:
                log.exception("the batcher's on_batch callback failed")
