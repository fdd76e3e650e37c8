"""Audio/latent error measures on signals whose answers are known in closed form."""

import math

import pytest
import torch

from foleyserve.fidelity_measures import (
    log_mel_distance,
    log_mel_spectrogram,
    max_abs,
    mel_filterbank,
    mel_to_hz,
    hz_to_mel,
    rel_l2,
    snr_db,
)

SR = 48000


def _sine(freq: float = 1000.0, seconds: float = 0.5, amp: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_identical_signals_have_zero_error_and_infinite_snr():
    x = _sine()
    assert rel_l2(x, x) == 0.0
    assert max_abs(x, x) == 0.0
    assert snr_db(x, x) == math.inf
    assert log_mel_distance(x, x) == 0.0


def test_scaled_noise_gives_the_snr_it_was_scaled_to():
    ref = _sine(440.0)
    noise = _noise(ref.numel(), 1).double()
    for target_db in (10.0, 20.0, 40.0):
        # ||noise|| = ||ref|| * 10^(-snr/20), so 10 log10(P_ref / P_noise) is exactly target_db.
        scaled = noise * (ref.double().norm() / noise.norm()) * 10 ** (-target_db / 20)
        assert snr_db(ref.double() + scaled, ref.double()) == pytest.approx(target_db, abs=1e-9)
        assert rel_l2(ref.double() + scaled, ref.double()) == pytest.approx(10 ** (-target_db / 20), rel=1e-9)


def test_rel_l2_of_a_gain_error_and_of_a_silent_reference():
    x = _noise(1000, 2)
    assert rel_l2(1.5 * x, x) == pytest.approx(0.5, rel=1e-6)
    zeros = torch.zeros(10)
    assert rel_l2(zeros, zeros) == 0.0
    assert rel_l2(torch.ones(10), zeros) == math.inf
    assert snr_db(torch.ones(10), zeros) == -math.inf


def test_shape_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(ValueError, match="shapes differ"):
        rel_l2(torch.zeros(2, 5), torch.zeros(5))
    with pytest.raises(ValueError, match="shapes differ"):
        log_mel_distance(torch.zeros(100), torch.zeros(200))


def test_mel_scale_round_trips_and_filterbank_is_a_partition_of_triangles():
    hz = torch.tensor([0.0, 700.0, 4000.0, 24000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(hz)), hz)
    fb = mel_filterbank(1025, 64, SR)
    assert fb.shape == (1025, 64)
    assert fb.min() >= 0 and fb.max() <= 1.0 + 1e-12
    # Every band has some weight and peaks close to 1 (its centre falls between two bins).
    assert torch.all(fb.max(dim=0).values > 0.5)
    # Neighbouring triangles overlap so that between the first and last centre the weights sum to 1.
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(0.0)), float(hz_to_mel(SR / 2)), 66))
    freqs = torch.linspace(0, SR / 2, 1025, dtype=torch.float64)
    inner = fb[(freqs >= edges[1]) & (freqs <= edges[-2])].sum(dim=1)
    assert inner.numel() > 900
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-9)
    with pytest.raises(ValueError):
        mel_filterbank(1025, 64, SR, f_max=30000)


def test_log_mel_puts_a_tone_in_its_band_at_about_zero_db():
    spec = log_mel_spectrogram(_sine(1000.0), SR, n_mels=128)
    assert spec.shape[0] == 128
    mid = spec[:, spec.shape[1] // 2]
    band = int(mid.argmax())
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(0.0)), float(hz_to_mel(SR / 2)), 130))[1:-1]
    assert abs(float(centres[band]) - 1000.0) < 100.0
    assert -6.0 < float(mid.max()) < 3.0  # a full-scale sine reads about 0 dB
    # Batched input keeps its leading axes.
    assert log_mel_spectrogram(torch.stack([_sine(), _sine(2000.0)]), SR).shape[:2] == (2, 128)


def test_log_mel_distance_of_a_gain_change_is_that_gain_in_db():
    x = 0.1 * _noise(SR // 2, 3)
    # Doubling the amplitude quadruples the power in every band: 10 log10(4) dB everywhere.
    assert log_mel_distance(2 * x, x) == pytest.approx(10 * math.log10(4), abs=1e-6)
    silence = torch.zeros(SR // 4)
    assert log_mel_distance(silence, silence) == 0.0
    # A short clip still gives one frame.
    assert log_mel_distance(x[:100], 2 * x[:100]) > 0
