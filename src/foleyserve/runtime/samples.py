"""Several samples (seeds) of one request as ONE batcher job.

Like a long video (:mod:`foleyserve.pipeline.longform`), a multi-sample request is one job of the
queue with a batch key of its own: the prepare thread decodes and encodes once, and the denoise
thread runs every seed as a row of one loop (what :func:`foleyserve.pipeline.variations.generate_variations`
does for the CLI). Its rows never mix with other jobs: they share every condition, so the only
thing batching them with strangers would buy is a longer wait for all of them.

With ``rank`` (the server's ``best_of``) the written samples are then scored and ranked by
:func:`foleyserve.pipeline.bestof.rank_results`, with the Synchformer features the job already
computed; every sample's file stays (a client may prefer another), ``best`` says which one is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from foleyserve.pipeline import longform
from foleyserve.pipeline.pipeline import PreparedJob
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.variations import variation_requests

if TYPE_CHECKING:
    import torch

    from foleyserve.pipeline.pipeline import Engine, ProgressFn


@dataclass
class SamplesJob:
    """A prepared multi-sample request: one prepared row per seed, sharing the encoders' output."""

    request: GenerationRequest
    rows: list[PreparedJob]
    rank: tuple[str, ...] | None = None
    ranking: dict[str, Any] | None = None  # after finish(), with rank: bestof.Ranking.as_dict()
    best: int = 0  # the index of the kept row (the first without rank)

    def batch_key(self) -> tuple:
        return ("samples", id(self))

    @property
    def timer(self):  # the batcher reads the DiT time from the first prepared job of a batch
        return self.rows[0].timer


def check(request: GenerationRequest, seeds: list[int]) -> None:
    """Raise :class:`RequestError` for seeds the request cannot be sampled with."""
    for r in variation_requests(request, seeds):
        r.validate()
    if longform.plan_for(request) is not None:
        # Each window would need its own rows; until that is wired, say so rather than run N jobs.
        raise RequestError(
            "several samples work for clips up to 15 s and for text to audio; for a longer video or a "
            "start/duration range, send one job per seed"
        )


def expand(prepared: PreparedJob, seeds: list[int], rank: tuple[str, ...] | None = None) -> SamplesJob:
    """One row per seed, each writing its own file (``NAME_seed{S}.EXT``)."""
    rows = [
        PreparedJob(request=r, visual=prepared.visual, text=prepared.text, decoded=prepared.decoded,
                    timer=copy.deepcopy(prepared.timer))
        for r in variation_requests(prepared.request, seeds)
    ]
    return SamplesJob(request=prepared.request, rows=rows, rank=rank)


def is_samples(job: object) -> bool:
    return isinstance(job, SamplesJob)


def sample(
    engine: "Engine", job: SamplesJob, *, progress: "ProgressFn | None" = None,
    keep_rows: Callable[[], "list[bool] | None"] | None = None,
) -> "list[torch.Tensor]":
    """All seeds in one loop; ``keep_rows()`` (one flag: this job) drops every row at once."""
    n = len(job.rows)

    def rows() -> "list[bool] | None":
        keep = keep_rows() if keep_rows is not None else None
        return None if keep is None or keep[0] else [False] * n

    return engine.sample_jobs(job.rows, progress=progress, keep_rows=rows if keep_rows is not None else None)


def finish(engine: "Engine", job: SamplesJob, latents: "list[torch.Tensor]") -> list[GenerationResult]:
    """DAC decode and write each row, then rank them if asked; a failure fails the whole job (its
    files are removed)."""
    results: list[GenerationResult] = []
    try:
        for row, lat in zip(job.rows, latents):
            results.append(engine.finish(row, lat))
        if job.rank:
            _rank(engine, job, results)
    except BaseException:
        discard(results)
        raise
    return results


def _rank(engine: "Engine", job: SamplesJob, results: list[GenerationResult]) -> None:
    from foleyserve.pipeline.bestof import rank_results

    # Text to audio has a stand-in clip whose sync features mean nothing: no DeSync for it.
    sync = None if job.request.video is None else job.rows[0].visual.sync
    ranking = rank_results(engine, results, prompt=job.request.prompt, sync_feat=sync, rank=job.rank)
    job.ranking, job.best = ranking.as_dict(), ranking.best
    kept = results[ranking.best]
    kept.timings["score"] = ranking.seconds
    kept.warnings.extend(ranking.notes)


def discard(results: list[GenerationResult]) -> None:
    for result in results:
        for f in result.files:
            Path(f).unlink(missing_ok=True)
