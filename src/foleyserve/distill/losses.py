"""Spectral losses for the light decoder: multi-resolution STFT and log-mel (differentiable, float32).

The multi-resolution STFT loss is Parallel WaveGAN's (Yamamoto et al., 2020): spectral convergence
plus log-magnitude L1 at several FFT sizes, so neither time nor frequency resolution is favoured.
The mel term is an L1 between log-mel spectra, the perceptual term HiFi-GAN and DAC train with; its
filterbank is :func:`foleyserve.fidelity_measures.mel_filterbank`, the one the evaluation's
log-mel distance uses.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from foleyserve.fidelity_measures import mel_filterbank

STFT_RESOLUTIONS: tuple[tuple[int, int], ...] = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)


@lru_cache(maxsize=16)
def _window(n_fft: int, device: str) -> torch.Tensor:
    return torch.hann_window(n_fft, device=device)


@lru_cache(maxsize=16)
def _mel(n_fft: int, n_mels: int, sample_rate: int, device: str) -> torch.Tensor:
    return mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate).float().to(device)


def _magnitude(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), n_fft, hop_length=hop, window=_window(n_fft, str(x.device)),
                      center=True, return_complex=True)
    return spec.abs().clamp_min(1e-7)


def multi_resolution_stft_loss(pred: torch.Tensor, target: torch.Tensor,
                               resolutions: tuple[tuple[int, int], ...] = STFT_RESOLUTIONS) -> torch.Tensor:
    """Mean over resolutions of spectral convergence + log-magnitude L1 (waveforms ``[..., T]``)."""
    total = pred.new_zeros(())
    for n_fft, hop in resolutions:
        p, t = _magnitude(pred, n_fft, hop), _magnitude(target, n_fft, hop)
        convergence = (t - p).norm() / t.norm().clamp_min(1e-7)
        total = total + convergence + (p.log() - t.log()).abs().mean()
    return total / len(resolutions)


def log_mel_l1(pred: torch.Tensor, target: torch.Tensor, sample_rate: int = 48000, *, n_fft: int = 2048, hop: int = 512,
               n_mels: int = 128) -> torch.Tensor:
    """L1 between log10-mel power spectra (the evaluation's filterbank and resolution)."""
    fb = _mel(n_fft, n_mels, sample_rate, str(pred.device))
    p = (_magnitude(pred, n_fft, hop).pow(2).transpose(-1, -2) @ fb).clamp_min(1e-10).log10()
    t = (_magnitude(target, n_fft, hop).pow(2).transpose(-1, -2) @ fb).clamp_min(1e-10).log10()
    return (p - t).abs().mean()


def decoder_loss(pred: torch.Tensor, target: torch.Tensor, sample_rate: int = 48000, *, mel_weight: float = 1.0,
                 wave_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The light decoder's loss: multi-resolution STFT + ``mel_weight`` x log-mel L1 + ``wave_weight``
    x waveform L1 (the last keeps the phase, which the two magnitude terms leave free, close to the
    teacher's, as the SNR measure wants). Returns the loss and its parts for the log."""
    stft = multi_resolution_stft_loss(pred, target)
    mel = log_mel_l1(pred, target, sample_rate)
    wave = (pred.float() - target.float()).abs().mean() / target.float().abs().mean().clamp_min(1e-7)
    loss = stft + mel_weight * mel + wave_weight * wave
    return loss, {"stft": stft.item(), "mel": mel.item(), "wave": wave.item()}
