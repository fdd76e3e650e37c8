"""The loudness step of the engine's write: the decoder's waveform -> what is written.

Kept apart from :mod:`foleyserve.loudness` (pure numpy) so that module never sees torch, and
apart from the engine so the write step stays a few lines. Nothing here touches the decoder's
waveform itself: the result keeps it raw for caches and conformance checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from foleyserve import loudness
from foleyserve.pipeline.requests import GenerationRequest


@dataclass
class Mastered:
    """The Foley to write, the mp4's mix of a kept original (None: the plain sum), and what the
    loudness step did. ``notes`` fills in as the mix runs, so read it after writing."""

    waveform: torch.Tensor
    mix: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    report: loudness.LoudnessReport | None = None
    notes: list[str] = field(default_factory=list)


def master(request: GenerationRequest, audio: torch.Tensor, sample_rate: int) -> Mastered:
    """Normalise ``audio`` ([1, T] float32, CPU) to ``request.loudness`` and prepare the ducked,
    normalised mix for a kept original; ``request.loudness=None`` passes the audio through."""
    if request.loudness is None:
        return Mastered(waveform=audio)
    target = float(request.loudness)
    samples, report = loudness.normalise(audio.detach().cpu().numpy(), sample_rate, target)
    done = Mastered(waveform=torch.from_numpy(samples), report=report)

    def mix(foley: np.ndarray, original: np.ndarray) -> np.ndarray:
        mixed, mix_report = loudness.duck_and_mix(foley, original, sample_rate, target)
        done.notes.extend(filter(None, [mix_report.note()]))
        return mixed

    done.mix = mix
    done.notes.extend(filter(None, [report.note()]))
    return done
