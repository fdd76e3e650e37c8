"""What every distillation training loop does after its optimizer step: the EMA, the JSON log,
the progress callback and the periodic checkpoint (one place for both the student and the light
decoder)."""

from __future__ import annotations

import json
from typing import IO, Callable

import torch


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, it: int, max_decay: float) -> None:
    """Move ``ema`` towards ``model``. The decay ramps up with the run (Karras-style), so short runs
    are not stuck near the starting weights."""
    decay = min(max_decay, (1 + it) / (10 + it))
    for pe, ps in zip(ema.parameters(), model.parameters()):
        pe.lerp_(ps, 1 - decay)


def end_iteration(it: int, iterations: int, record: dict, *, log: IO[str], log_every: int, checkpoint_every: int,
                  save: Callable[[int], None], progress: Callable[[int, int, dict], None] | None) -> None:
    """Log iteration ``it`` (0-based) every ``log_every`` and at the end, report progress, and
    checkpoint every ``checkpoint_every``."""
    done = it + 1
    if done % log_every == 0 or done == iterations:
        log.write(json.dumps(record) + "\n")
        log.flush()
    if progress:
        progress(done, iterations, record)
    if done % checkpoint_every == 0:
        save(done)
