"""Loudness and mixing of the finished audio: pure functions on numpy waveforms.

What is measured, and how:

* **Integrated loudness** (LUFS) is ITU-R BS.1770-4 / EBU R128, measured by ``pyloudnorm``
  (K-weighting, 400 ms blocks with 75 % overlap, -70 LUFS absolute gate, -10 LU relative gate).
  A mono waveform is measured as *dual mono* (both channels of a stereo pair, +3.01 dB over a
  single channel): the Foley is mono in a .wav/.flac but is played, and muxed into the mp4, on two
  channels, so the mono file and the mp4 then read the same. This is ffmpeg's ``ebur128=dualmono``.
* **True peak** (dBTP) is BS.1770-4 Annex 2: the largest magnitude of the signal oversampled 4x
  (48 kHz -> 192 kHz) by a windowed-sinc polyphase interpolator (``scipy.signal.resample_poly``),
  never less than the sample peak.

:func:`normalise` is a pure gain (no limiter, no compression: Foley transients are the point of
Foley). The gain reaches the target unless the true-peak ceiling or the gain cap holds it back; the
returned :class:`LoudnessReport` says which. Audio below the absolute gate (silence, a noise floor)
is left exactly as it is, so an empty scene is never blown up into hiss.

**Default target: -23 LUFS integrated, -1 dBTP** (EBU R128; ATSC A/85 is -24 LKFS). The Foley
is a stem that post-production mixes under dialogue and music, and -23 LUFS is the level such
deliverables are made at: it leaves 22 dB of crest factor under the -1 dBTP ceiling, enough for a
door slam or a gunshot to keep its transient, where a web target (-14/-16 LUFS) would pull those
clips below the target or need a limiter. It is also where the demo model already sits (about
-23 dBFS). Web delivery asks for ``loudness=-14`` (or -16); ``None`` ("off") writes the model's
raw output like the official code.

:func:`duck` is a feed-forward sidechain compressor: the video's own sound (as mixed) drives a
gain reduction on the Foley so dialogue and other loud original sound stay on top. See
:class:`DuckSettings` for the threshold, ratio, depth, attack and release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TARGET_LUFS = -23.0
DEFAULT_TRUE_PEAK_DBTP = -1.0
# Loud enough targets to reach a mastered web level, quiet enough to stay above the gate.
MIN_TARGET_LUFS, MAX_TARGET_LUFS = -60.0, -5.0
# The most a normalisation may raise the level: a whisper-quiet output is made audible, but a
# noise floor just above the gate is not raised to programme level.
MAX_GAIN_DB = 30.0
ABSOLUTE_GATE_LUFS = -70.0  # BS.1770-4's absolute gating threshold
BLOCK_SECONDS = 0.4  # BS.1770-4 gating block: shorter audio has no integrated loudness
TRUE_PEAK_OVERSAMPLING = 4  # BS.1770-4 Annex 2 for 48 kHz


def _channels(waveform: np.ndarray) -> np.ndarray:
    """[T], [1, T] or [C, T] -> float64 [C, T] (a copy never shares memory with the input)."""
    a = np.asarray(waveform, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] not in (1, 2):
        raise ValueError(f"waveform must be [T], [1, T] or [2, T], got shape {a.shape}")
    return a


def _db(x: float) -> float:
    return 20.0 * math.log10(x) if x > 0 else -math.inf


def check_target(target_lufs: float) -> float:
    """``target_lufs`` as a float, or ValueError naming the allowed range."""
    t = float(target_lufs)
    if not math.isfinite(t) or not MIN_TARGET_LUFS <= t <= MAX_TARGET_LUFS:
        raise ValueError(f"loudness must be from {MIN_TARGET_LUFS:g} to {MAX_TARGET_LUFS:g} LUFS (or off), got {target_lufs!r}")
    return t


def measure(waveform: np.ndarray, sample_rate: int, *, dual_mono: bool = True) -> float:
    """Integrated loudness in LUFS (BS.1770-4); -inf when every block is under the absolute gate,
    NaN when the audio is shorter than one 400 ms block. Mono is measured as dual mono unless
    ``dual_mono=False``."""
    import pyloudnorm  # imported here: it pulls scipy, which only the write step needs

    a = _channels(waveform)
    if a.shape[1] < BLOCK_SECONDS * sample_rate:
        return math.nan
    if a.shape[0] == 1 and dual_mono:
        a = np.concatenate([a, a])
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(a.T))


def true_peak(waveform: np.ndarray, sample_rate: int = 48000, *, oversample: int = TRUE_PEAK_OVERSAMPLING) -> float:
    """True peak in dBTP: the largest magnitude of the ``oversample``-times upsampled signal
    (BS.1770-4 Annex 2), and never less than the sample peak; -inf for silence."""
    from scipy.signal import resample_poly

    a = _channels(waveform)
    if a.shape[1] == 0:
        return -math.inf
    peak = float(np.max(np.abs(a)))
    if oversample > 1 and a.shape[1] > 1:
        peak = max(peak, float(np.max(np.abs(resample_poly(a, oversample, 1, axis=-1)))))
    return _db(peak)


@dataclass(frozen=True)
class LoudnessReport:
    """What :func:`normalise` measured and did (levels in LUFS / dBTP, gain in dB)."""

    input_lufs: float
    output_lufs: float
    target_lufs: float
    gain_db: float
    true_peak_dbtp: float  # of the output
    ceiling_dbtp: float
    # "target" (reached), "true_peak" (the ceiling held it lower), "max_gain" (the cap did),
    # "below_gate" (silent or under -70 LUFS: untouched), "too_short" (under 400 ms: untouched)
    limited_by: str

    @property
    def shortfall_lu(self) -> float:
        """How far under the target the output stays (0 when reached or above)."""
        if not math.isfinite(self.output_lufs):
            return math.inf
        return max(0.0, self.target_lufs - self.output_lufs)

    def note(self) -> str | None:
        """A sentence for the user when the target was not reached, else None."""
        if self.limited_by == "below_gate":
            return (f"loudness: the audio is below the {ABSOLUTE_GATE_LUFS:g} LUFS gate (silent); its level was left "
                    f"as it is rather than raising noise to {self.target_lufs:g} LUFS")
        if self.limited_by == "too_short":
            return f"loudness: the audio is shorter than {BLOCK_SECONDS:g} s, too short to measure; its level was left as it is"
        if self.shortfall_lu <= 0.5:
            return None
        why = {
            "true_peak": f"the {self.ceiling_dbtp:g} dBTP true-peak ceiling holds it there (sharp transients)",
            "max_gain": f"the gain is capped at +{MAX_GAIN_DB:g} dB (the output is very quiet)",
        }.get(self.limited_by, "")
        return f"loudness: {self.output_lufs:.1f} LUFS, {self.shortfall_lu:.1f} LU under the {self.target_lufs:g} LUFS target: {why}"


def normalise(
    waveform: np.ndarray,
    sample_rate: int,
    target_lufs: float = DEFAULT_TARGET_LUFS,
    *,
    ceiling_dbtp: float = DEFAULT_TRUE_PEAK_DBTP,
    max_gain_db: float = MAX_GAIN_DB,
) -> tuple[np.ndarray, LoudnessReport]:
    """Scale ``waveform`` ([T], [1, T] or [2, T]) to ``target_lufs`` integrated loudness with its
    true peak at or under ``ceiling_dbtp``; returns float32 audio of the same shape and a report.

    One gain for the whole clip: the smallest of the gain to the target, ``max_gain_db``, and the
    gain that puts the true peak on the ceiling. Audio under the absolute gate or shorter than one
    block is returned unchanged.
    """
    target = check_target(target_lufs)
    original = np.asarray(waveform)
    lufs = measure(original, sample_rate)
    tp = true_peak(original, sample_rate)
    if not math.isfinite(lufs):
        why = "too_short" if math.isnan(lufs) else "below_gate"
        return original.astype(np.float32, copy=True), LoudnessReport(lufs, lufs, target, 0.0, tp, ceiling_dbtp, why)
    gain_db, limited_by = target - lufs, "target"
    if gain_db > max_gain_db:
        gain_db, limited_by = max_gain_db, "max_gain"
    if tp + gain_db > ceiling_dbtp:
        gain_db, limited_by = ceiling_dbtp - tp, "true_peak"
    out = (original.astype(np.float64) * 10.0 ** (gain_db / 20.0)).astype(np.float32)
    # Gain is linear, so the output's loudness and true peak follow without measuring again.
    return out, LoudnessReport(lufs, lufs + gain_db, target, gain_db, tp + gain_db, ceiling_dbtp, limited_by)


# ---------------------------------------------------------------------------------------------
# ducking


@dataclass(frozen=True)
class DuckSettings:
    """The sidechain ducker that keeps the video's own sound on top of the Foley.

    The detector is the RMS of the original (as mixed, after its keep gain; the louder channel)
    over ``window_ms``, evaluated every millisecond. Above ``threshold_db`` (dBFS RMS) the Foley is
    turned down by ``(level - threshold) * (1 - 1/ratio)`` dB, at most ``depth_db``. The reduction
    follows with one-pole smoothing: rising with time constant ``attack_ms`` (63 % of a step in
    that time) and falling with ``release_ms``.

    Defaults: -36 dBFS sits above typical room tone and ambience (-45 dBFS and lower) and below
    dialogue (-30 to -18 dBFS RMS), so speech ducks the Foley and a quiet background does not;
    4:1 with a 12 dB floor is a firm but not gated dip; 10 ms attack catches syllable onsets, and
    250 ms release lets the Foley come back between phrases without pumping on every word.
    """

    threshold_db: float = -36.0
    ratio: float = 4.0
    depth_db: float = 12.0
    attack_ms: float = 10.0
    release_ms: float = 250.0
    window_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.ratio < 1.0 or self.depth_db < 0.0 or min(self.attack_ms, self.release_ms, self.window_ms) <= 0:
            raise ValueError("DuckSettings needs ratio >= 1, depth_db >= 0 and positive attack, release and window")


_CONTROL_RATE = 1000  # gain-computer updates per second (1 ms resolution for attack and release)


def duck_gain(sidechain: np.ndarray, sample_rate: int, length: int, settings: DuckSettings = DuckSettings()) -> np.ndarray:
    """The ducker's linear gain per sample ([length], in (0, 1]) for Foley of ``length`` samples
    under ``sidechain`` ([T] or [C, T]; zero-padded or cut to ``length``)."""
    side = _channels(sidechain)
    power = np.zeros(length)
    n = min(length, side.shape[1])
    power[:n] = np.max(side[:, :n] ** 2, axis=0)
    hop = max(1, sample_rate // _CONTROL_RATE)
    window = max(1, int(round(settings.window_ms * sample_rate / 1000)))
    centres = np.arange(hop // 2, length, hop)
    # Centred moving mean square from a running sum: O(T), no per-sample Python.
    csum = np.concatenate([[0.0], np.cumsum(power)])
    lo = np.clip(centres - window // 2, 0, length)
    hi = np.clip(centres - window // 2 + window, 0, length)
    mean_square = (csum[hi] - csum[lo]) / window
    level_db = 10.0 * np.log10(np.maximum(mean_square, 1e-20))
    wanted = np.minimum(settings.depth_db, np.maximum(0.0, level_db - settings.threshold_db) * (1.0 - 1.0 / settings.ratio))
    dt = hop / sample_rate
    a_att = 1.0 - math.exp(-dt / (settings.attack_ms / 1000))
    a_rel = 1.0 - math.exp(-dt / (settings.release_ms / 1000))
    reduction = np.empty_like(wanted)
    r = 0.0
    # A branch per step (attack or release) is inherently sequential; at 1 kHz a 15 s clip is
    # 15k iterations, a few milliseconds.
    for i, w in enumerate(wanted.tolist()):
        r += (a_att if w > r else a_rel) * (w - r)
        reduction[i] = r
    per_sample = np.interp(np.arange(length), centres, reduction) if len(centres) else np.zeros(length)
    return (10.0 ** (-per_sample / 20.0)).astype(np.float32)


def duck(foley: np.ndarray, sidechain: np.ndarray, sample_rate: int, settings: DuckSettings = DuckSettings()) -> np.ndarray:
    """``foley`` ([T] or [C, T]) turned down where ``sidechain`` is loud (see :class:`DuckSettings`)."""
    f = np.asarray(foley, dtype=np.float32)
    return f * duck_gain(sidechain, sample_rate, f.shape[-1], settings)


def duck_and_mix(
    foley: np.ndarray,
    original: np.ndarray,
    sample_rate: int,
    target_lufs: float = DEFAULT_TARGET_LUFS,
    *,
    ceiling_dbtp: float = DEFAULT_TRUE_PEAK_DBTP,
    settings: DuckSettings = DuckSettings(),
) -> tuple[np.ndarray, LoudnessReport]:
    """Mix the video's own sound (``original``, [2, N], already at its keep gain) with the Foley
    ([2, T], already normalised): the Foley ducked under the original, the sum as long as the
    longer of the two, then normalised to ``target_lufs`` under ``ceiling_dbtp``.

    The Foley comes in at the target so that the keep gain means the same thing whatever level
    the model produced: the original at that gain relative to a Foley at the target.
    """
    f = _channels(foley)
    o = _channels(original)
    ducked = duck(f, o, sample_rate, settings)
    n = max(f.shape[1], o.shape[1])
    mixed = np.zeros((max(f.shape[0], o.shape[0]), n), np.float64)
    mixed[:, : f.shape[1]] += ducked
    mixed[:, : o.shape[1]] += o
    return normalise(mixed, sample_rate, target_lufs, ceiling_dbtp=ceiling_dbtp)


__all__ = [
    "DEFAULT_TARGET_LUFS", "DEFAULT_TRUE_PEAK_DBTP", "DuckSettings", "LoudnessReport", "check_target", "duck",
    "duck_and_mix", "duck_gain", "measure", "normalise", "true_peak",
]
