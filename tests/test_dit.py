"""The MMDiT denoiser against the official manifests and conformance fixtures."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foleyserve.fidelity_measures import max_abs, rel_l2
from foleyserve.models import build_dit, xl_config, xxl_config
from foleyserve.models.dit import DiTConfig, tiny_config

FP32_MAX_ABS, FP32_REL_L2 = 1e-4, 1e-5


@pytest.fixture(scope="module")
def tiny_weights(fixtures_dir):
    path = fixtures_dir / "tiny_foley_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return config, load_file(str(path))


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    config, sd = tiny_weights
    model = build_dit(config)
    model.load_state_dict(sd, strict=True)
    return model


def _call(model, d):
    with torch.no_grad():
        return model(x=d["x"], t=d["t"], clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"])


@pytest.mark.parametrize("name,config", [("xxl", xxl_config()), ("xl", xl_config())])
def test_state_dict_matches_official_manifest(reference_dir, name, config):
    manifest = json.loads((reference_dir / f"manifest-{name}.json").read_text())
    model = build_dit(config, dtype=torch.bfloat16, device="meta")
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest["state_dict"])  # same keys, same order
    assert ours == manifest["state_dict"]
    assert len(ours) == manifest["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]
    assert all(p.is_meta for p in model.parameters())


def test_tiny_config_is_the_fixture_config(tiny_weights):
    config, _ = tiny_weights
    assert DiTConfig.from_model_kwargs(config) == DiTConfig.from_model_kwargs(tiny_config())


@pytest.mark.parametrize("seconds", ["2s", "4s", "10s"])
def test_forward_matches_official_fp32(fixtures_dir, tiny_model, seconds):
    d = load_file(str(fixtures_dir / f"fwd_{seconds}.safetensors"))
    out = _call(tiny_model, d)
    assert out.shape == d["out"].shape and out.dtype == torch.float32
    assert max_abs(out, d["out"]) <= FP32_MAX_ABS
    assert rel_l2(out, d["out"]) <= FP32_REL_L2
    assert rel_l2(out, d["out_fp64"]) <= FP32_REL_L2


def test_intermediates_4s(fixtures_dir, tiny_model):
    d = load_file(str(fixtures_dir / "fwd_4s.safetensors"))
    captured = {}

    def keep(name, pick=lambda o: o):
        return lambda _m, _i, out: captured.__setitem__(name, pick(out))

    m = tiny_model
    hooks = [
        m.time_in.register_forward_hook(keep("time_in_out")),
        m.cond_in.register_forward_hook(keep("cond_in_out")),
        m.audio_embedder.register_forward_hook(keep("audio_embedder_out")),
        m.visual_proj.register_forward_hook(keep("visual_proj_out")),
        m.sync_in.register_forward_hook(keep("sync_in_out")),
        m.final_layer.register_forward_hook(keep("final_layer_out")),
    ]
    for i, blk in enumerate(m.triple_blocks):
        hooks.append(blk.register_forward_hook(keep(f"triple_blocks.{i}.out_audio", lambda o: o[0])))
        if i < len(m.triple_blocks) - 1:  # the last block's visual output is discarded (not computed)
            hooks.append(blk.register_forward_hook(keep(f"triple_blocks.{i}.out_v_cond", lambda o: o[1])))
    for i, blk in enumerate(m.single_blocks):
        hooks.append(blk.register_forward_hook(keep(f"single_blocks.{i}.out")))
    try:
        _call(m, d)
    finally:
        for h in hooks:
            h.remove()
    expected = {k.removeprefix("inter."): v for k, v in d.items() if k.startswith("inter.")}
    checked = 0
    for name, ref in expected.items():
        if name not in captured:
            assert name == f"triple_blocks.{len(m.triple_blocks) - 1}.out_v_cond"
            continue
        got = captured[name]
        assert got.shape == ref.shape, name
        assert max_abs(got, ref) <= FP32_MAX_ABS, name
        assert rel_l2(got, ref) <= FP32_REL_L2, name
        checked += 1
    assert checked == len(expected) - 1


def test_final_layer_modulation_is_dead(fixtures_dir, tiny_weights):
    config, sd = tiny_weights
    d = load_file(str(fixtures_dir / "fwd_2s.safetensors"))
    model = build_dit(config)
    model.load_state_dict(sd, strict=True)
    before = _call(model, d)
    with torch.no_grad():
        for p in model.final_layer.adaLN_modulation.parameters():
            p.mul_(-3.0).add_(1.0)
    assert torch.equal(_call(model, d), before)


def test_prepared_conditions_give_the_same_forward(fixtures_dir, tiny_model):
    d = load_file(str(fixtures_dir / "fwd_4s.safetensors"))
    with torch.no_grad():
        cond = tiny_model.prepare_conditions(
            clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"], audio_len=d["x"].shape[-1]
        )
        a = tiny_model.predict_flow(d["x"], d["t"], cond)
        b = tiny_model.predict_flow(d["x"], d["t"], cond)  # conditions are reusable across steps
    assert torch.equal(a, b)
    assert torch.equal(a, _call(tiny_model, d))


def test_batch_rows_are_independent(fixtures_dir, tiny_model):
    d = load_file(str(fixtures_dir / "fwd_2s.safetensors"))
    full = _call(tiny_model, d)
    row = _call(tiny_model, {k: v[1:2] for k, v in d.items() if k in ("x", "t", "clip_feat", "sync_feat", "cond")})
    assert max_abs(row[0], full[1]) <= 1e-5


def test_bf16_forward_close_to_fp64(fixtures_dir, tiny_weights):
    config, sd = tiny_weights
    model = build_dit(config, dtype=torch.bfloat16)
    model.load_state_dict(sd, strict=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for seconds in ("2s", "4s", "10s"):
        d = load_file(str(fixtures_dir / f"fwd_{seconds}.safetensors"))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = _call(model, d).float()
        assert rel_l2(out, d["out_fp64"]) <= 2e-2, seconds
        assert max_abs(out, d["out_fp64"]) <= 0.1, seconds


def test_every_conditioning_path_matters(fixtures_dir, tiny_model):
    d = load_file(str(fixtures_dir / "fwd_2s.safetensors"))
    base = _call(tiny_model, d)
    for key in ("x", "t", "clip_feat", "sync_feat", "cond"):
        changed = dict(d)
        changed[key] = d[key] + (5.0 if key == "t" else 0.1 * torch.ones_like(d[key]))
        assert rel_l2(_call(tiny_model, changed), base) > 1e-4, key


def test_unsupported_configs_are_refused():
    with pytest.raises(NotImplementedError, match="sync_modulation"):
        DiTConfig.from_model_kwargs({**tiny_config(), "sync_modulation": True})
    with pytest.raises(NotImplementedError, match="use_attention_mask"):
        DiTConfig.from_model_kwargs({**tiny_config(), "use_attention_mask": True})
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig.from_model_kwargs({**tiny_config(), "num_heads": 3})


def test_sync_tokens_must_come_in_segments_of_eight(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_model.prepare_conditions(
            clip_feat=torch.zeros(1, 16, 768), sync_feat=torch.zeros(1, 41, 768), cond=torch.zeros(1, 5, 768), audio_len=100
        )


def test_build_is_seeded(tiny_weights):
    config, _ = tiny_weights
    a, b, c = build_dit(config, seed=3), build_dit(config, seed=3), build_dit(config, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["triple_blocks.0.audio_mod.linear.weight"], pc["triple_blocks.0.audio_mod.linear.weight"])


def test_explicit_visual_gather_matches_identity_shortcut(fixtures_dir, tiny_model):
    d = load_file(str(fixtures_dir / "fwd_4s.safetensors"))
    with torch.no_grad():
        cond = tiny_model.prepare_conditions(
            clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"], audio_len=d["x"].shape[-1]
        )
        assert cond.visual_gather is None  # the round trip is the identity at these lengths
        fast = tiny_model.predict_flow(d["x"], d["t"], cond)
        cond.visual_gather = torch.arange(d["clip_feat"].shape[1])
        assert torch.equal(tiny_model.predict_flow(d["x"], d["t"], cond), fast)


def test_conv_layout_and_tap_layout_agree(fixtures_dir, tiny_weights):
    """The CPU (conv1d) and GPU (tap GEMM) forms of the fused convs compute the same step, and FP8
    quantises the same tap-major weight from either."""
    from foleyserve.precision import apply_policy

    config, sd = tiny_weights
    d = load_file(str(fixtures_dir / "fwd_4s.safetensors"))
    outs = {}
    for conv_layout in (False, True):
        model = build_dit(config)
        model.load_state_dict(sd, strict=True)
        model.fuse_for_inference(conv_layout=conv_layout)
        assert model.single_blocks[0].linear2.w13.conv_layout is conv_layout
        outs[conv_layout] = _call(model, d)
        apply_policy(model, "fp8-weight-only")
        outs[(conv_layout, "fp8")] = model.single_blocks[0].linear2.w13.weight
    assert rel_l2(outs[True], outs[False]) <= 1e-6
    assert rel_l2(outs[True], d["out_fp64"]) <= FP32_REL_L2
    assert torch.equal(outs[(True, "fp8")].view(torch.uint8), outs[(False, "fp8")].view(torch.uint8))
