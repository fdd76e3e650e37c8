"""Variations: one request, several seeds, ONE denoising batch.

The encoders run once; every seed becomes a row of the same batched loop (``Engine.sample_jobs``
batches jobs with identical conditions at the cost of their rows only), then each row is decoded
and written on its own, so a seed's audio is what a single request with that seed gives (to float
rounding: a batched GEMM may sum in another order).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine, PreparedJob, ProgressFn

MAX_VARIATIONS = 16


def sample_output(output: str | Path | None, seed: int) -> Path | None:
    """Where variation ``seed`` of ``output`` goes: NAME_seed{S}.EXT beside it (None stays None)."""
    if output is None:
        return None
    out = Path(output)
    return out.with_name(f"{out.stem}_seed{seed}{out.suffix}")


def variation_requests(request: GenerationRequest, seeds: list[int]) -> list[GenerationRequest]:
    """One request per seed, each writing its own file (see :func:`sample_output`)."""
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > MAX_VARIATIONS:
        raise RequestError(f"variations need 1 to {MAX_VARIATIONS} different seeds, got {seeds!r}")
    return [replace(request, seed=int(s), output=sample_output(request.output, int(s))) for s in seeds]


def variation_jobs(engine: "Engine", request: GenerationRequest, seeds: list[int],
                   progress: "ProgressFn | None" = None) -> "list[PreparedJob] | None":
    """One prepared job per seed, all sharing one run of the encoders (None when ``request`` is a
    long one that runs in windows instead). Each job writes its own file (:func:`sample_output`)."""
    from foleyserve.pipeline.pipeline import PreparedJob

    requests = variation_requests(request, seeds)
    for r in requests:
        r.validate()
    try:
        from foleyserve.pipeline import longform
    except ImportError:  # the long-video path is optional here
        longform = None  # type: ignore[assignment]
    if longform is not None and request.video is not None and longform.plan_for(requests[0]) is not None:
        return None
    # The shared encoder run writes nothing: no output, and so no kept-original mix to check
    # (each job keeps its full request for the write).
    first = engine.prepare(replace(requests[0], output=None, keep_original_audio_gain=None), progress=progress)
    return [PreparedJob(request=r, visual=first.visual, text=first.text, decoded=first.decoded, timer=copy.deepcopy(first.timer))
            for r in requests]


def generate_variations(engine: "Engine", request: GenerationRequest, seeds: list[int],
                        progress: "ProgressFn | None" = None) -> list[GenerationResult]:
    """``len(seeds)`` variations of ``request`` (its ``seed`` is ignored), in seed order.

    A request the windowed long-video path handles (over 15 s) runs once per seed instead."""
    jobs = variation_jobs(engine, request, seeds, progress)
    if jobs is None:
        return [engine.generate(r, progress=progress) for r in variation_requests(request, seeds)]
    latents = engine.sample_jobs(jobs, progress=progress)
    return [engine.finish(job, lat) for job, lat in zip(jobs, latents)]
