"""Warming an engine up: compile (and on CUDA capture) the denoising step of chosen buckets before
the first request, so no user pays for it (``Engine.warm_up``, the server's ``warmup_seconds``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine


def warm_up(engine: "Engine", seconds: Iterable[float], *, batch_sizes: Iterable[int] = (1,), steps: int = 1,
            progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """See :meth:`Engine.warm_up`."""
    from foleyserve.pipeline.features import TextFeatures, VisualFeatures
    from foleyserve.pipeline.lengths import clip_lengths

    plan = [(float(s), int(b)) for s in seconds for b in batch_sizes]
    done: list[dict] = []
    dit = engine.components.dit
    cfg = dit.config
    for i, (sec, batch) in enumerate(plan):
        if progress:
            progress(i, len(plan), f"{sec:g} s x {batch}")
        n = clip_lengths(sec)
        visual = VisualFeatures(
            siglip=torch.zeros(1, n["visual_len"], cfg.clip_dim, device=engine.device),
            sync=torch.zeros(1, n["sync_len"], cfg.sync_feat_dim, device=engine.device),
            frames_25fps=n["frames_25fps"],
        )
        text = TextFeatures(text=torch.zeros(1, 8, cfg.condition_dim, device=engine.device),
                            uncond=torch.zeros(1, 8, cfg.condition_dim, device=engine.device))
        start = time.perf_counter()
        engine.sample(visual, text, seeds=list(range(batch)), steps=steps, guidance=4.5)
        done.append({"seconds": sec, "batch": batch, "wall_s": round(time.perf_counter() - start, 3)})
    if progress:
        progress(len(plan), len(plan), "done")
    if engine.compile_cache is not None and engine.step_graphs is not None:
        from foleyserve.pipeline.stepgraph import save_compile_artifacts

        save_compile_artifacts(engine.compile_cache)
    return done
