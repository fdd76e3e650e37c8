"""The batcher's result-cache fast path: a repeated upload whose result is cached is answered
from the upload's bytes alone, with no decode and no queue (see :mod:`foleyserve.runtime.batcher`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from foleyserve import media
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.stages import StageTimer
from foleyserve.runtime.batch_job import Job

if TYPE_CHECKING:
    from foleyserve.runtime.buckets import _Trim

log = logging.getLogger("foleyserve.batcher")

_SOURCE_MEMO = 4096  # videos remembered for the no-decode result-cache path


class ResultFastPath:
    """Mixed into :class:`~foleyserve.runtime.batcher.Batcher`, whose state these methods use."""

    def _source_key(self, video: str | Path | bytes | None) -> str | None:
        if video is None:  # text to audio: nothing uploaded to recognise
            return None
        try:
            data = bytes(video) if isinstance(video, (bytes, bytearray)) else Path(video).read_bytes()
        except OSError:
            return None  # the prepare stage reports an unreadable video
        return hashlib.sha256(data).hexdigest() + "/" + self.config.length_bucket

    def _fast_hit(self, request: GenerationRequest, skey: str | None) -> tuple[GenerationResult, _Trim | None] | None:
        """A cached result for a video seen before, found from its bytes alone: no decode, no queue.
        Any problem here just means the job takes the normal path."""
        if skey is None or not self._use_cache() or not self._sources:
            return None
        try:
            from foleyserve.runtime.cache import CachedResult, normalise_prompt, result_key

            assert self.cache is not None
            with self._cond:
                known = self._sources.get(skey)
                if known is not None:
                    self._sources.move_to_end(skey)
            if known is None:
                return None
            fkey, decoded, trim = known
            rkey = result_key(
                fkey, normalise_prompt(request.prompt), normalise_prompt(request.negative_prompt), request.seed,
                request.steps, float(request.guidance), self.engine.components.name, self._precision_id(),
            )
            hit = self.cache.get_result(rkey)
            if not isinstance(hit, CachedResult):
                return None
            timer = StageTimer(self.engine.device)
            return self.engine.write_result(request, hit.waveform, decoded, timer), trim
        except Exception:  # noqa: BLE001 - the slow path is always correct
            log.warning("result-cache fast path failed; the job takes the normal path", exc_info=True)
            return None

    def _remember_source(self, skey: str | None, fkey: str, decoded: media.DecodedVideo, trim: "_Trim | None") -> None:
        if skey is None:
            return
        with self._cond:
            self._sources[skey] = (fkey, dataclasses.replace(decoded, frames={}), trim)
            self._sources.move_to_end(skey)
            while len(self._sources) > _SOURCE_MEMO:
                self._sources.popitem(last=False)

    def _finish_fast(
        self, request: GenerationRequest, priority: str, job_id: str | None, result: GenerationResult, trim: "_Trim | None"
    ) -> Job:
        with self._cond:
            if job_id is None:
                job_id = uuid.uuid4().hex
            elif job_id in self._jobs:
                raise RequestError(f"job id {job_id!r} is already in use; choose another or leave it out")
            job = Job(id=job_id, request=request, priority=priority, progress=(request.steps, request.steps))
            job._seq = next(self._seq)
            job._trim = trim
            job.cache_hit = True
            job.started = time.time()
            self._jobs[job_id] = job
        self._end(job, "succeeded", result=self._restore(job, result))
        return job

