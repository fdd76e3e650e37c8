"""Best-of-N: N variations of one request in ONE denoising batch, scored, and the best one kept.

The encoders run once and every seed is a row of the same denoising loop (:mod:`.variations`).
Each candidate is scored as it would be written (at the request's loudness): DeSync against the
Synchformer features the run already computed (the visual branch does not run again) and CLAP
against the prompt (:mod:`foleyserve.scoring`). :func:`rank_results` is the scoring half on its
own, for callers that ran the variations themselves (the server's batcher).

DeSync needs 4.8 s of video and audio; a shorter clip (or text to audio, which has no video) is
ranked by CLAP alone, and the result says so.

For a server (the engine is not thread-safe: call these where the batcher runs the engine):

* ``best_of(engine, request, n, rank=("desync", "clap"), scorers=None, *, seeds=None,
  keep_all=False, progress=None) -> (GenerationResult, list[dict])``: the whole thing for one
  request; the result's ``candidates``/``ranked_by`` go into the job's record as they are (plain
  JSON types).
* ``rank_results(engine, results, *, prompt, sync_feat, rank=("desync", "clap"), scorers=None)
  -> Ranking``: when the batcher ran the variations itself (``variation_jobs`` +
  ``Engine.sample_jobs`` + ``Engine.finish`` with no output); ``sync_feat`` is the jobs'
  ``visual.sync`` (None for text to audio). ``Ranking.best`` indexes ``results``;
  ``Ranking.as_dict()`` is the JSON for the API. Write the best with ``Engine.write_result``.
* ``engine_scorers(engine)`` loads the scorers ahead of time (a server's warm-up), else the first
  best-of does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.stages import StageTimer
from foleyserve.pipeline.variations import MAX_VARIATIONS, variation_jobs

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine, ProgressFn
    from foleyserve.scoring import Scorers

DEFAULT_RANK = ("desync", "clap")
DEMO_NOTE = "demo scorers: random weights, the scores are noise"


@dataclass
class Ranking:
    """How one request's candidates scored: ``candidates`` in input order, each a JSON-safe dict
    ``{index, seed, desync, offsets_sec, clap, rank}`` (``rank`` 0 = best); ``best`` the index of
    the kept one; ``ranked_by`` the measures that decided (``asked`` minus what no candidate has);
    ``notes`` what a caller should tell the user (CLAP-only ranking, demo scorers)."""

    best: int
    candidates: list[dict[str, Any]]
    ranked_by: tuple[str, ...]
    asked: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ranking as plain JSON types (what an API response can carry as is)."""
        return {
            "best": self.best, "best_seed": self.candidates[self.best]["seed"], "ranked_by": list(self.ranked_by),
            "asked": list(self.asked), "candidates": [dict(c) for c in self.candidates], "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def engine_scorers(engine: "Engine") -> "Scorers":
    """The engine's scorers, loaded on first use and kept on it (``engine.scorers``).

    The demo engine gets :func:`~foleyserve.pipeline.demo.demo_scorers`; a real one
    :func:`~foleyserve.scoring.load_scorers` from its model folder, sharing its Synchformer visual
    branch and CLAP text tower, so only the audio branch + sync head and CLAP's audio tower load."""
    found = getattr(engine, "scorers", None)
    if found is not None:
        return found  # type: ignore[return-value]
    if engine.components.is_demo:
        from foleyserve.pipeline.demo import demo_scorers

        scorers = demo_scorers(engine.components, device=engine.device)
    else:
        from foleyserve.scoring import load_scorers

        if engine.model_dir is None:
            raise RequestError("best-of needs the scorers, and this engine does not know its model folder: "
                               "pass scorers=foleyserve.scoring.load_scorers(MODEL_DIR, components=engine.components)")
        scorers = load_scorers(engine.model_dir, device=engine.device, components=engine.components, clap_dir=engine.clap_dir)
    engine.scorers = scorers
    return scorers


def _measures(rank: str | Sequence[str]) -> tuple[str, ...]:
    from foleyserve.scoring import parse_measures

    try:
        return parse_measures(rank)
    except ValueError as e:
        raise RequestError(str(e)) from None


@torch.no_grad()
def rank_results(
    engine: "Engine",
    results: Sequence[GenerationResult],
    *,
    prompt: str,
    sync_feat: torch.Tensor | None,
    rank: str | Sequence[str] = DEFAULT_RANK,
    scorers: "Scorers | None" = None,
) -> Ranking:
    """Score and rank the results of one request's variations (same video, prompt and length).

    ``sync_feat``: the run's Synchformer features (``PreparedJob.visual.sync``, [1, 8*S, D]);
    None for text to audio (no DeSync). Each result is scored as written
    (``output_waveform``: at the request's loudness). ``rank``: ``"desync,clap"``, ``"clap"``,
    ... or a sequence of those. ``scorers`` default to :func:`engine_scorers`. Nothing is written.
    """
    from foleyserve.scoring import clap_audio_text_score, rank as rank_by, score_candidates, usable_measures

    asked = _measures(rank)
    if not results:
        raise RequestError("nothing to rank: no results")
    scorers = scorers or engine_scorers(engine)
    start = time.perf_counter()
    waves = [r.output_waveform if r.output_waveform is not None else r.waveform for r in results]
    # With offload the shared CLAP text tower lives in host RAM between uses: lend it for the score.
    with engine._on_device(engine.components.clap):
        if sync_feat is None:
            claps = clap_audio_text_score(scorers, waves, prompt, sample_rate=engine.sample_rate)
            scores = [{"index": i, "desync": None, "offsets_sec": None, "clap": c} for i, c in enumerate(claps)]
        else:
            scores = score_candidates(scorers, None, waves, prompt, sample_rate=engine.sample_rate, sync_feat=sync_feat)
    ranked_by = usable_measures(scores, asked)
    best, ordered = rank_by(scores, by=ranked_by)
    ranks = {c["index"]: c["rank"] for c in ordered}
    candidates = [
        {"index": s["index"], "seed": int(r.seed), "desync": s["desync"], "offsets_sec": s["offsets_sec"],
         "clap": float(s["clap"]), "rank": ranks[s["index"]]}
        for s, r in zip(scores, results)
    ]
    notes = []
    dropped = [m for m in asked if m not in ranked_by]
    if dropped:
        why = ("text to audio has no video to sync to" if sync_feat is None else
               f"DeSync needs at least 4.8 s and the clip is {results[0].audio_seconds:.2f} s")
        notes.append(f"ranked by {', '.join(ranked_by)} alone: {why}")
    if scorers.is_demo:
        notes.append(DEMO_NOTE)
    return Ranking(best=best["index"], candidates=candidates, ranked_by=ranked_by, asked=asked, notes=notes,
                   seconds=time.perf_counter() - start)


def best_of(
    engine: "Engine",
    request: GenerationRequest,
    n: int | None = None,
    rank: str | Sequence[str] = DEFAULT_RANK,
    scorers: "Scorers | None" = None,
    *,
    seeds: Sequence[int] | None = None,
    keep_all: bool = False,
    progress: "ProgressFn | None" = None,
) -> tuple[GenerationResult, list[dict[str, Any]]]:
    """Generate ``n`` variations of ``request`` as one batch, score them and keep the best.

    Seeds are ``request.seed .. request.seed + n - 1`` (or ``seeds``). Only the best is written,
    to ``request.output``; with ``keep_all`` every candidate is also written as NAME_seed{S}.EXT.
    Returns the best's :class:`GenerationResult` (its ``seed`` the winning one, ``candidates`` and
    ``ranked_by`` filled, the ranking's notes among its ``warnings``, a ``score`` stage in its
    timings) and the candidates: one dict per seed, in seed order,
    ``{index, seed, desync, offsets_sec, clap, rank, kept, file}``.

    Up to 15 s of video (or text to audio); a longer request raises :class:`RequestError`.
    """
    by = _measures(rank)
    if seeds is None:
        if n is None or isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VARIATIONS:
            raise RequestError(f"best-of needs n from 1 to {MAX_VARIATIONS} candidates, got {n!r}")
        seeds = [request.seed + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    request.validate()
    timer = StageTimer(engine.device)
    if scorers is None and getattr(engine, "scorers", None) is None:
        with timer.stage("scorers"):  # the first best-of of an engine loads them
            scorers = engine_scorers(engine)
    # Candidates not kept are not written; the file-only fields go with the file.
    base = request if keep_all else replace(request, output=None, keep_original_audio_gain=None, bit_depth=None)
    jobs = variation_jobs(engine, base, seeds, progress)
    if jobs is None:
        raise RequestError("best-of runs on one clip of up to 15 s; for a longer range use --num-samples "
                           "and compare the files (e.g. with `foleyserve score`)")
    latents = engine.sample_jobs(jobs, progress=progress)
    results = [engine.finish(job, lat) for job, lat in zip(jobs, latents)]
    if progress:
        progress("score", 0, 1)
    with timer.stage("score"):
        ranking = rank_results(engine, results, prompt=request.prompt, rank=by, scorers=scorers,
                               sync_feat=None if request.video is None else jobs[0].visual.sync)
    if progress:
        progress("score", 1, 1)
    kept = jobs[ranking.best]
    kept.timer.records.update(timer.records)
    final = engine.write_result(replace(request, seed=seeds[ranking.best]), results[ranking.best].waveform,
                                kept.decoded, kept.timer)
    candidates = [
        {**c, "kept": c["index"] == ranking.best,
         "file": str(results[c["index"]].files[0]) if results[c["index"]].files else None}
        for c in ranking.candidates
    ]
    final.candidates = candidates
    final.ranked_by = list(ranking.ranked_by)
    final.warnings.extend(ranking.notes)
    return final, candidates
