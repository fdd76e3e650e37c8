"""Synchformer visual branch against the official implementation (fixtures section 5)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from foleyserve.fidelity_measures import max_abs, rel_l2
from foleyserve.models.synchformer import (
    build_synchformer_visual,
    preprocess_frames_uint8,
    split_synchformer_state_dict,
)

TINY = dict(embed_dim=64, num_heads=2, depth=2)


@pytest.fixture(scope="module")
def manifest(reference_dir):
    with open(reference_dir / "manifest-synchformer.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_weights(fixtures_dir):
    return load_file(fixtures_dir / "tiny_synchformer_visual_weights.safetensors")


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_file(fixtures_dir / "synchformer_visual.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    model = build_synchformer_visual(**TINY).eval()
    model.load_state_dict(tiny_weights, strict=True)
    return model


@pytest.fixture(scope="module")
def frames(fixture):
    return preprocess_frames_uint8(fixture["frames_uint8_THWC"]).unsqueeze(0)  # [1, 24, 3, 224, 224]


def _report(name, got, ref):
    err = max_abs(got, ref), rel_l2(got, ref)
    print(f"{name}: max_abs={err[0]:.3e} rel_l2={err[1]:.3e}")
    return err


def test_state_dict_matches_manifest(manifest):
    with torch.device("meta"):
        model = build_synchformer_visual()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {k: tuple(v[0]) for k, v in manifest["state_dict"].items() if v[2] == "visual"}
    assert ours == official
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["params_by_branch"][
        "visual (vfeat_extractor) - USED by the Foley pipeline"
    ]


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        model = build_synchformer_visual()
        seg = model(torch.empty(3, 1, 16, 3, 224, 224))
        clip = model.encode(torch.empty(2, 250, 3, 224, 224), batch_size=7)  # 10 s at 25 fps
    assert seg.shape == (3, 1, 8, 768)
    assert clip.shape == (2, 240, 768)


def test_split_full_official_state_dict(manifest):
    entries = manifest["state_dict"]
    full = {k: torch.empty(v[0], device="meta") for k, v in entries.items()}
    visual, ignored = split_synchformer_state_dict(full)
    assert list(visual) == [k for k, v in entries.items() if v[2] == "visual"]
    assert ignored == [k for k, v in entries.items() if v[2] != "visual"]
    assert len(visual) + len(ignored) == manifest["num_tensors"]
    assert any(k.startswith("afeat_extractor.") for k in ignored)
    assert "vproj.weight" in ignored and any(k.startswith("transformer.") for k in ignored)
    with torch.device("meta"):
        model = build_synchformer_visual()
    model.load_state_dict(visual, strict=True)


def test_split_then_strict_load_real_values(manifest, tiny_weights, fixture, frames):
    # A tiny "full checkpoint": the visual fixture weights plus small stand-ins for the other branches.
    full = dict(tiny_weights)
    for k, v in manifest["state_dict"].items():
        if v[2] != "visual":
            full[k] = torch.zeros(1)
    visual, ignored = split_synchformer_state_dict(full)
    assert len(ignored) == sum(1 for v in manifest["state_dict"].values() if v[2] != "visual")
    model = build_synchformer_visual(**TINY).eval()
    model.load_state_dict(visual, strict=True)
    segments = torch.stack([frames[0, :16], frames[0, 8:24]]).unsqueeze(1)
    with torch.inference_mode():
        out = model(segments)
    assert max_abs(out, fixture["segment_out"]) <= 1e-4


def test_segment_forward_matches_official(tiny_model, frames, fixture):
    segments = torch.stack([frames[0, :16], frames[0, 8:24]]).unsqueeze(1)  # [2, 1, 16, 3, 224, 224]
    with torch.inference_mode():
        out = tiny_model(segments)
    assert out.shape == (2, 1, 8, 64)
    err_abs, err_rel = _report("segment_out vs fp32", out, fixture["segment_out"])
    assert err_abs <= 1e-4 and err_rel <= 1e-5


def test_encode_matches_official(tiny_model, frames, fixture):
    with torch.inference_mode():
        out = tiny_model.encode(frames)
    assert out.shape == (1, 16, 64)
    err_abs, err_rel = _report("out vs fp32", out, fixture["out"])
    _report("out vs fp64", out, fixture["out_fp64"])
    assert err_abs <= 1e-4 and err_rel <= 1e-5
    # The fp64 reference must be at least as close as the official fp32 run is to it.
    assert rel_l2(out, fixture["out_fp64"]) <= 1e-5


def test_float64_is_structurally_exact(tiny_weights, fixture):
    # With the fixture's own input rounding (frame / 255 in fp32), a float64 run should agree with the
    # official float64 run to float64 precision, which pins every op, not just the tolerance.
    model = build_synchformer_visual(**TINY).eval()
    model.load_state_dict(tiny_weights, strict=True)
    model.double()
    x = fixture["frames_uint8_THWC"].permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    with torch.inference_mode():
        out = model.encode(x.double().unsqueeze(0))
    err_abs, err_rel = _report("fp64 impl vs out_fp64", out, fixture["out_fp64"])
    assert err_rel <= 1e-12


def test_batch_size_chunking(tiny_model, frames):
    # Two clips of different content so the batch-major ordering is checked too: 24 frames -> 2 windows each.
    clips = torch.cat([frames, frames.flip(1)], dim=0)
    with torch.inference_mode():
        full = tiny_model.encode(clips)
        chunked = tiny_model.encode(clips, batch_size=3)
        single = tiny_model.encode(clips[1:])
    assert full.shape == (2, 16, 64)
    assert max_abs(chunked, full) <= 1e-5
    assert max_abs(single[0], full[1]) <= 1e-5


def test_window_count():
    model = build_synchformer_visual(embed_dim=8, num_heads=2, depth=1).eval()
    with torch.inference_mode():
        out = model.encode(torch.zeros(1, 16 + 8 + 7, 3, 224, 224))  # 31 frames -> 2 windows
    assert out.shape == (1, 16, 8)


def test_too_short_raises():
    model = build_synchformer_visual(embed_dim=8, num_heads=2, depth=1)
    with pytest.raises(ValueError, match=r"at least 16 frames at 25 fps \(0\.64 s"):
        model.encode(torch.zeros(1, 15, 3, 224, 224))


def test_preprocess(fixture):
    raw = fixture["frames_uint8_THWC"][:2]
    x = preprocess_frames_uint8(raw)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    ref = (raw.permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    assert max_abs(x, ref) <= 2.5e-7  # one float32 rounding of x/255, doubled by the normalisation
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(NotImplementedError):
        preprocess_frames_uint8(torch.zeros(1, 240, 320, 3, dtype=torch.uint8))
