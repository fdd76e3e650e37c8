"""Discriminators and LSGAN losses for the light decoder's optional adversarial term.

A decoder trained on spectral losses alone (multi-resolution STFT, log-mel, waveform L1) matches
magnitudes on average but leaves fine spectral structure and phase to chance; the known result is a
buzzy, "metallic" sound that the spectral distances barely register. HiFi-GAN (Kong et al., 2020)
and DAC (Kumar et al., 2023) remove it with discriminators that look at the waveform the way those
losses cannot, and with feature matching on their activations:

* :class:`MultiPeriodDiscriminator` (HiFi-GAN): the waveform folded into ``[T / p, p]`` for a few
  prime periods, 2-D convolutions along time only, so each sub-discriminator judges periodic
  structure at one period;
* :class:`MultiResolutionSTFTDiscriminator` (the DAC / EnCodec idea, without DAC's band split):
  2-D convolutions over the complex STFT (real and imaginary as two channels) at several
  resolutions, so it sees phase as well as magnitude.

Losses are least-squares (LSGAN), as in HiFi-GAN and DAC. Channel counts are small by default
(the demo teacher's decoder is tiny); every width is a parameter for a real-size run.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

# One sub-discriminator's result: its logits and the activations feature matching compares.
DiscOutput = tuple[torch.Tensor, list[torch.Tensor]]

PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11)
STFT_RESOLUTIONS: tuple[tuple[int, int], ...] = ((2048, 512), (1024, 256), (512, 128))  # (n_fft, hop)


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> DiscOutput:
    """Leaky-ReLU conv layers then the 1-channel head: the logits and every layer's output (the
    features that feature matching compares)."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        feats.append(x)
    x = post(x)
    feats.append(x)
    return x.flatten(1), feats


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's sub-discriminator for one period: strided (k, 1) convolutions over ``[T / p, p]``."""

    def __init__(self, period: int, channels: Sequence[int] = (8, 16, 32, 32), kernel: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        layers, c_in = [], 1
        for c in channels:
            layers.append(weight_norm(nn.Conv2d(c_in, c, (kernel, 1), (stride, 1), padding=(kernel // 2, 0))))
            c_in = c
        # A last unstrided layer widens the receptive field without shrinking the time axis further.
        layers.append(weight_norm(nn.Conv2d(c_in, c_in, (kernel, 1), 1, padding=(kernel // 2, 0))))
        self.convs = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(c_in, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> DiscOutput:
        x = wave.reshape(wave.shape[0], 1, -1)
        pad = (-x.shape[-1]) % self.period
        if pad:
            x = F.pad(x, (0, pad), mode="reflect" if pad < x.shape[-1] else "constant")
        return _conv_stack(self.convs, self.post, x.reshape(x.shape[0], 1, -1, self.period))


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period (HiFi-GAN's primes 2, 3, 5, 7, 11 by default)."""

    def __init__(self, periods: Sequence[int] = PERIODS, channels: Sequence[int] = (8, 16, 32, 32)) -> None:
        super().__init__()
        self.discs = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, wave: torch.Tensor) -> list[DiscOutput]:
        return [d(wave) for d in self.discs]


class STFTDiscriminator(nn.Module):
    """2-D convolutions over one resolution's complex STFT, laid out ``[B, 2, frames, bins]``;
    the strided layers halve the frequency axis only, keeping the frames' time resolution."""

    def __init__(self, n_fft: int, hop: int, channels: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # Every layer halves the frequency axis: a full-resolution first layer would cost several
        # times the light decoder's own step on the CPU.
        layers, c_in = [], 2
        for _ in range(depth):
            layers.append(weight_norm(nn.Conv2d(c_in, channels, (3, 9), (1, 2), padding=(1, 4))))
            c_in = channels
        layers.append(weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, wave: torch.Tensor) -> DiscOutput:
        spec = torch.stft(wave.reshape(-1, wave.shape[-1]).float(), self.n_fft, self.hop, window=self.window,
                          center=True, return_complex=True)
        return _conv_stack(self.convs, self.post, torch.view_as_real(spec).permute(0, 3, 2, 1))  # [B, 2, frames, bins]


class MultiResolutionSTFTDiscriminator(nn.Module):
    """One :class:`STFTDiscriminator` per ``(n_fft, hop)`` resolution."""

    def __init__(self, resolutions: Sequence[tuple[int, int]] = STFT_RESOLUTIONS, channels: int = 8) -> None:
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, h, channels) for n, h in resolutions)

    def forward(self, wave: torch.Tensor) -> list[DiscOutput]:
        return [d(wave) for d in self.discs]


class DecoderDiscriminator(nn.Module):
    """The multi-period and the multi-resolution STFT discriminators together; ``forward`` returns
    every sub-discriminator's ``(logits, features)``."""

    def __init__(self, periods: Sequence[int] = PERIODS, period_channels: Sequence[int] = (8, 16, 32, 32),
                 resolutions: Sequence[tuple[int, int]] = STFT_RESOLUTIONS, stft_channels: int = 8) -> None:
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods, period_channels)
        self.mrd = MultiResolutionSTFTDiscriminator(resolutions, stft_channels)

    def forward(self, wave: torch.Tensor) -> list[DiscOutput]:
        return self.mpd(wave) + self.mrd(wave)


def discriminator_loss(real: list[DiscOutput], fake: list[DiscOutput]) -> torch.Tensor:
    """LSGAN discriminator loss, ``(1 - D(real))^2 + D(fake)^2``, averaged over sub-discriminators
    (pass ``fake`` computed on a detached waveform)."""
    total = sum((1 - r).pow(2).mean() + f.pow(2).mean() for (r, _), (f, _) in zip(real, fake))
    return total / len(real)  # type: ignore[operator]


def generator_adv_loss(fake: list[DiscOutput]) -> torch.Tensor:
    """LSGAN generator loss, ``(1 - D(fake))^2``, averaged over sub-discriminators."""
    return sum((1 - f).pow(2).mean() for f, _ in fake) / len(fake)  # type: ignore[operator]


def feature_matching_loss(real: list[DiscOutput], fake: list[DiscOutput]) -> torch.Tensor:
    """L1 between the discriminators' activations on real and generated audio, averaged over layers
    and sub-discriminators (real activations are treated as constants)."""
    total = sum(sum((a.detach() - b).abs().mean() for a, b in zip(fr, ff)) / len(fr) for (_, fr), (_, ff) in zip(real, fake))
    return total / len(real)  # type: ignore[operator]
