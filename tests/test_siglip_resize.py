"""SigLIP2 preprocessing equals Pillow 12's bilinear resize value for value, whatever Pillow is installed.

The references were made by tests/fixtures/siglip_resize.py with Pillow 12.3.0 (Pillow 13 resizes some
portrait frames vertically first, see foleyserve/media/preprocess.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from foleyserve import media

_spec = importlib.util.spec_from_file_location("siglip_resize", Path(__file__).parent / "fixtures" / "siglip_resize.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
REF = gen.load()


def test_fixture_is_from_pillow_12():
    assert str(REF["pillow_version"]).startswith("12.")


@pytest.mark.parametrize("width, height", gen.SIZES, ids=[f"{w}x{h}" for w, h in gen.SIZES])
def test_resize_equals_pillow_12(width, height):
    expected = REF[f"{width}x{height}"]
    got = media.pil_bilinear_resize(gen.frame(width, height), (512, 512))
    diff = np.abs(got.astype(np.int16) - expected)
    assert diff.max() == 0, f"{(diff > 0).mean():.3%} of values differ (max {diff.max()})"


def test_siglip_pixels_and_decode_path_use_it():
    f = gen.frame(853, 479)
    expected = torch.from_numpy(REF["853x479"]).permute(2, 0, 1).float()[None]
    assert torch.equal(media.siglip_pixels(f[None]), (expected.div(255) - 0.5) / 0.5)
    np.testing.assert_array_equal(media.siglip_frames(f[None])[0], REF["853x479"])


def test_batches_and_tensors_give_the_same_bytes():
    frames = np.stack([gen.frame(320, 240, seed) for seed in range(3)])
    one_by_one = np.stack([media.pil_bilinear_resize(f, (512, 512)) for f in frames])
    np.testing.assert_array_equal(media.pil_bilinear_resize(frames, (512, 512)), one_by_one)
    np.testing.assert_array_equal(media.pil_bilinear_resize(torch.from_numpy(frames), (512, 512)), one_by_one)


@pytest.mark.parametrize("size", [(512, 300), (300, 512), (7, 1000), (1, 1), (512, 512)])
def test_skipped_passes_and_extreme_shapes_match_the_fixed_point_rule(size):
    # Against a direct, slow integer implementation of the same rule (Pillow's coefficients, round
    # half up, clip between passes), covering one-axis resizes (a pass skipped) and tiny inputs.
    width, height = size
    img = gen.frame(width, height, seed=5)
    np.testing.assert_array_equal(media.pil_bilinear_resize(img, (512, 512)), _slow_reference(img, 512, 512))


def _slow_reference(img: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    def matrix(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        fs = max(scale, 1.0)
        m = np.zeros((n_out, n_in), np.int64)
        for o in range(n_out):
            center = (o + 0.5) * scale
            lo = max(int(center - fs + 0.5), 0)
            hi = min(int(center + fs + 0.5), n_in)
            w = [max(0.0, 1.0 - abs((i - center + 0.5) * (1.0 / fs))) for i in range(lo, hi)]
            total = 0.0
            for v in w:
                total += v
            m[o, lo:hi] = [int(0.5 + (v / total if total else v) * (1 << 22)) for v in w]
        return m

    x = img.astype(np.int64)
    if w_out != img.shape[1]:
        x = np.clip((np.einsum("hwc,ow->hoc", x, matrix(img.shape[1], w_out)) + (1 << 21)) >> 22, 0, 255)
    if h_out != img.shape[0]:
        x = np.clip((np.einsum("hwc,oh->owc", x, matrix(img.shape[0], h_out)) + (1 << 21)) >> 22, 0, 255)
    return x.astype(np.uint8)
