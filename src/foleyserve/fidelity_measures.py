"""Error measures shared by the conformance tests and the fidelity tool.

All measures are computed in float64 so that the measurement adds no error of its own:

* :func:`rel_l2` ``||a - b|| / ||b||`` and :func:`snr_db` (the same number in decibels);
* :func:`log_mel_distance`: how far apart two waveforms sound, as the mean over frames of the RMS
  difference (in dB) of their log-mel spectra. It is built from ``torch.stft`` and a triangular mel
  filterbank made here (:func:`mel_filterbank`), so it needs no audio library.
"""

from __future__ import annotations

import math

import torch


def _check_shapes(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # Broadcasting would silently compare, e.g., one row against a whole batch.
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; compare tensors of the same shape")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    _check_shapes(a, b, "max_abs")
    return (a.double() - b.double()).abs().max().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64 so the measure itself adds no error.

    A zero reference gives 0 when ``a`` is zero too and ``inf`` otherwise (never NaN).
    """
    _check_shapes(a, b, "rel_l2")
    b64 = b.double()
    err = (a.double() - b64).norm().item()
    ref = b64.norm().item()
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / ref


def snr_db(a: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``a`` against ``reference`` in dB: 10 log10(||ref||^2 / ||a - ref||^2).

    ``inf`` for identical tensors; ``-inf`` when the reference is silent and ``a`` is not.
    """
    err = rel_l2(a, reference)
    if err == 0.0:
        return math.inf
    if math.isinf(err):
        return -math.inf
    return -20.0 * math.log10(err)


# ------------------------------------------------------------------------------- spectra


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor | float) -> torch.Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, *, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular filters ``[n_freqs, n_mels]`` (float64) mapping an rfft power spectrum to mel bands.

    Band edges are spaced evenly on the HTK mel scale between ``f_min`` and ``f_max`` (default
    Nyquist); each filter rises from its lower edge to 1 at its centre and falls to 0 at its upper
    edge (HTK style, peak 1, not area-normalised: a pure tone keeps its level in the band it falls in).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if n_freqs < 2 or n_mels < 1:
        raise ValueError(f"need at least 2 frequency bins and 1 mel band, got {n_freqs} and {n_mels}")
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} Hz, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower[None]) / (centre - lower)[None]
    falling = (upper[None] - freqs[:, None]) / (upper - centre)[None]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_spectrogram(
    wave: torch.Tensor,
    sample_rate: int = 48000,
    *,
    n_fft: int = 2048,
    hop: int = 512,
    n_mels: int = 128,
    floor_db: float = -100.0,
) -> torch.Tensor:
    """Log-mel power spectrogram in dB, ``[..., n_mels, frames]`` (float64).

    ``wave`` is ``[T]`` or ``[..., T]``; leading axes are kept. Power below ``floor_db`` (relative
    to a full-scale sine's 0 dB) is clamped, so silence compares as equal silence instead of -inf.
    """
    if wave.ndim == 0 or wave.shape[-1] == 0:
        raise ValueError("log_mel_spectrogram needs a non-empty waveform [..., T]")
    lead = wave.shape[:-1]
    x = wave.detach().double().reshape(-1, wave.shape[-1]).cpu()
    # Short clips still get one frame: pad to the FFT size.
    if x.shape[-1] < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(x, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant", return_complex=True)
    # Scaled so that a full-scale sine reads about 0 dB in its band.
    power = spec.abs().pow(2) * (2.0 / window.sum()) ** 2
    mel = torch.einsum("bft,fm->bmt", power, mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate))
    db = 10.0 * torch.log10(mel.clamp_min(10.0 ** (floor_db / 10.0)))
    return db.reshape(*lead, n_mels, db.shape[-1])


def log_mel_distance(a: torch.Tensor, b: torch.Tensor, sample_rate: int = 48000, **kwargs) -> float:
    """Mean over frames of the RMS (over mel bands) difference of two log-mel spectra, in dB.

    0 for identical audio; a few tenths of a dB is inaudible in practice, several dB is a clearly
    different sound. Extra keyword arguments go to :func:`log_mel_spectrogram`.
    """
    _check_shapes(a, b, "log_mel_distance")
    da = log_mel_spectrogram(a, sample_rate, **kwargs)
    db = log_mel_spectrogram(b, sample_rate, **kwargs)
    return (da - db).pow(2).mean(dim=-2).sqrt().mean().item()
