"""Full-length generation, the pure parts: window plan, per-window seeds, scene cuts and the joins.

The model hears at most 15 s at a time, so a longer range is cut into windows (see
:func:`plan_windows`), each generated like a standalone clip of its time range, and the windows'
audio is joined with equal-power crossfades (:func:`assemble`).

Choices, and why:

* **Windows.** As few as cover the range with at least :data:`OVERLAP` (2.5 s) between neighbours,
  all of ONE length (so they share a batch key and run as one denoising batch), on the 25 fps grid
  of the range's clock (so a window's 25 fps frame count, hence its latent length, is the same for
  every window of a constant-rate video). A 40 s range: 3 windows of 15 s at 0, 12.5 and 25 s.
  2.5 s leaves room to move a join onto a cut and is long enough that a full-overlap crossfade is
  inaudible as a seam, for 20 % of extra compute per join.
* **Joins.** Where the earlier window's frames show a scene cut inside the overlap, the join is a
  short (:data:`CUT_FADE`, 0.2 s) crossfade centred on the cut, so the sound changes with the
  picture; otherwise the crossfade spans the whole overlap. Both are equal-power (cos/sin gains),
  because neighbouring windows are independent generations (uncorrelated), whose powers add.
* **Cut rule.** ``d_k`` = mean absolute difference between 25 fps frames k-1 and k (the 224x224
  Synchformer inputs already decoded, every 4th pixel, scaled to [0, 1]). Frame k starts a new shot
  when ``d_k >= CUT_MIN_DIFF`` (0.10) and ``d_k >= CUT_RATIO`` (4) times the median ``d`` of the
  surrounding half second on each side: a jump, not fast motion. With several cuts in one overlap
  the strongest (largest ratio) wins.
* **Seeds.** Window 0 uses the request's seed (so a range of at most one window equals a standalone
  run of that clip with the same seed); window i > 0 uses the first 63 bits of
  ``sha256("foleyserve/window/{seed}/{i}")``: deterministic, and uncorrelated with the seeds of
  nearby requests (seed + i would make request seed 1's window 0 equal request seed 0's window 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

WINDOW = Fraction(15)  # the model's longest clip (the official decoder's 15 s)
OVERLAP = Fraction(5, 2)
GRID = Fraction(1, 25)  # window edges on the range's 25 fps sample grid
CUT_FADE = Fraction(1, 5)
CUT_MIN_DIFF = 0.10
CUT_RATIO = 4.0
CUT_CONTEXT = 12  # frames on each side for the local median (about half a second at 25 fps)


@dataclass(frozen=True)
class Window:
    """One generation window, in seconds on the source video's clock (``start`` inclusive, ``end`` exclusive)."""

    index: int
    start: Fraction
    end: Fraction

    @property
    def seconds(self) -> float:
        return float(self.end - self.start)


@dataclass(frozen=True)
class WindowPlan:
    """The windows that cover ``[start, end)`` of a video, in order."""

    start: Fraction
    end: Fraction
    windows: tuple[Window, ...]

    @property
    def seconds(self) -> float:
        return float(self.end - self.start)

    def overlaps(self) -> list[tuple[Fraction, Fraction]]:
        """``(start, end)`` of the overlap between each window and the next."""
        w = self.windows
        return [(w[i + 1].start, w[i].end) for i in range(len(w) - 1)]

    def describe(self) -> str:
        if len(self.windows) == 1:
            return f"one window of {self.windows[0].seconds:.2f} s"
        ov = [float(b - a) for a, b in self.overlaps()]
        return f"{len(self.windows)} windows of {self.windows[0].seconds:.2f} s, overlaps {min(ov):.2f}-{max(ov):.2f} s"


def _floor_grid(x: Fraction) -> Fraction:
    return math.floor(x / GRID) * GRID


def _ceil_grid(x: Fraction) -> Fraction:
    return math.ceil(x / GRID) * GRID


def plan_windows(start: float | Fraction, end: float | Fraction, *, window: Fraction = WINDOW, overlap: Fraction = OVERLAP) -> WindowPlan:
    """Cover ``[start, end)`` with the fewest equal windows of at most ``window`` seconds that
    overlap by at least ``overlap`` (less one 25 fps frame, from rounding to the grid)."""
    start, end = Fraction(start).limit_denominator(1_000_000), Fraction(end).limit_denominator(1_000_000)
    if not 0 <= start < end:
        raise ValueError(f"empty range {float(start)}-{float(end)} s")
    length = end - start
    if length <= window:
        return WindowPlan(start, end, (Window(0, start, end),))
    n = math.ceil((length - overlap) / (window - overlap))
    size = min(window, _ceil_grid((length + (n - 1) * overlap) / n))
    hop = (length - size) / (n - 1)
    windows = []
    for i in range(n):
        # Starts on the grid; the last window is pushed up to end at the range's end (it is then
        # cut there, a fraction of a frame short, when the range ends off the grid).
        offset = _floor_grid(i * hop) if i < n - 1 else _ceil_grid(length - size)
        s = start + offset
        windows.append(Window(i, s, min(s + size, end)))
    return WindowPlan(start, end, tuple(windows))


def window_seed(seed: int, index: int) -> int:
    """The noise seed of window ``index`` of a request with ``seed`` (see the module docstring)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"foleyserve/window/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def frame_jumps(frames: np.ndarray) -> np.ndarray:
    """``d[k]`` = mean |frame k - frame k-1| in [0, 1] over every 4th pixel (``d[0] = 0``)."""
    if len(frames) < 2:
        return np.zeros(len(frames), np.float64)
    small = frames[:, ::4, ::4].astype(np.int16)
    d = np.abs(np.diff(small, axis=0)).mean(axis=(1, 2, 3)) / 255.0
    return np.concatenate([[0.0], d])


def scene_cuts(frames: np.ndarray, lo: int = 1, hi: int | None = None) -> list[tuple[int, float]]:
    """``(k, ratio)`` for every frame k in ``[lo, hi)`` that starts a new shot (the rule above)."""
    d = frame_jumps(frames)
    hi = len(d) if hi is None else min(hi, len(d))
    cuts = []
    for k in range(max(lo, 1), hi):
        if d[k] < CUT_MIN_DIFF:
            continue
        around = np.concatenate([d[max(1, k - CUT_CONTEXT) : k], d[k + 1 : k + 1 + CUT_CONTEXT]])
        local = float(np.median(around)) if len(around) else 0.0
        ratio = d[k] / max(local, 1e-6)
        if d[k] >= CUT_RATIO * local:
            cuts.append((k, float(ratio)))
    return cuts


@dataclass(frozen=True)
class Join:
    """The crossfade from one window to the next, in seconds on the source clock."""

    start: Fraction
    end: Fraction
    at_cut: bool

    @property
    def seconds(self) -> float:
        return float(self.end - self.start)


def place_join(overlap: tuple[Fraction, Fraction], window_start: Fraction, frames25: np.ndarray | None) -> Join:
    """The join over ``overlap``: on the strongest scene cut of the earlier window's 25 fps frames
    (``frames25``, on that window's clock from ``window_start``) that leaves room for a
    :data:`CUT_FADE` crossfade inside the overlap, else the whole overlap."""
    a, b = overlap
    if frames25 is not None and len(frames25) > 1 and b - a > CUT_FADE:
        half = CUT_FADE / 2
        # A cut at sample k happened between samples k-1 and k: centre the fade between them.
        lo = math.ceil((a + half - window_start) / GRID + Fraction(1, 2))
        hi = math.floor((b - half - window_start) / GRID + Fraction(1, 2)) + 1
        cuts = scene_cuts(frames25, lo, hi)
        if cuts:
            k, _ = max(cuts, key=lambda c: c[1])
            centre = window_start + (k - Fraction(1, 2)) * GRID
            return Join(centre - half, centre + half, True)
    return Join(a, b, False)


def assemble(
    pieces: Sequence[tuple[Fraction, torch.Tensor] | None],
    joins: Sequence[Join],
    *,
    start: Fraction,
    end: Fraction,
    sample_rate: int,
) -> torch.Tensor:
    """Join window waveforms (``(window start, [T] audio)``, None for a window the video ended
    before) into ``[1, N]`` covering ``[start, end)``: equal-power crossfades over ``joins[i]``
    between window i and i+1, silence where no window has audio."""
    n_total = int(round((end - start) * sample_rate))
    out = torch.zeros(n_total, dtype=torch.float64)

    def at(t: Fraction) -> int:
        return int(round((t - start) * sample_rate))

    # A window's audio can stop a frame short of its span (a 24 fps video gives fewer 25 fps
    # samples): every fade must lie where both neighbours really have sound, or it ends in a step.
    fades: list[tuple[int, int] | None] = []
    for i, join in enumerate(joins):
        left, right = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else None
        if left is None or right is None:
            fades.append(None)
            continue
        j0 = max(at(join.start), at(right[0]))
        j1 = min(at(join.end), at(left[0]) + left[1].numel())
        fades.append((j0, max(j1, j0)))
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        w_start, audio = piece
        a = audio.detach().to("cpu", torch.float64).reshape(-1)
        o = at(w_start)
        gain = torch.ones(len(a), dtype=torch.float64)
        if i > 0 and fades[i - 1] is not None:
            j0, j1 = (x - o for x in fades[i - 1])  # type: ignore[union-attr]
            gain[: max(j0, 0)] = 0.0
            _ramp(gain, j0, j1, rising=True)
        if i < len(fades) and fades[i] is not None:
            j0, j1 = (x - o for x in fades[i])  # type: ignore[union-attr]
            _ramp(gain, j0, j1, rising=False)
            gain[max(j1, 0) :] = 0.0
        lo, hi = max(o, 0), min(o + len(a), n_total)
        if hi > lo:
            out[lo:hi] += (gain * a)[lo - o : hi - o]
    return out.to(torch.float32)[None]


def _ramp(gain: torch.Tensor, j0: int, j1: int, *, rising: bool) -> None:
    """Write an equal-power ramp over samples [j0, j1) of ``gain`` (clipped to its length)."""
    n = j1 - j0
    if n <= 0:
        return
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ramp = torch.sin(u * math.pi / 2) if rising else torch.cos(u * math.pi / 2)
    lo, hi = max(j0, 0), min(j1, len(gain))
    if hi > lo:
        gain[lo:hi] = ramp[lo - j0 : hi - j0]
