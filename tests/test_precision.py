"""Precision policies: layer placement, FP8 layers against float32, policy fidelity on the fixture."""


import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import load_fixture_model
from foleyserve.metrics import rel_l2
from foleyserve.models import build_dit
from foleyserve.models.dit import tiny_config
from foleyserve.models.layers import TokenConv1d
from foleyserve.pipeline.sampler import sample_latents
from foleyserve.precision import (
    POLICIES,
    Fp8Linear,
    Fp8TokenConv1d,
    apply_policy,
    keep_in_fp32,
    quantize_rows,
)


def _fixture_dit(fixtures_dir):
    return load_fixture_model(fixtures_dir / "tiny_foley_weights.safetensors", build_dit)


@pytest.fixture(scope="module")
def run(fixtures_dir):
    return load_file(str(fixtures_dir / "sampling_2s_cfg4.5_4steps.safetensors"))


def _sample(dit, run):
    return sample_latents(
        dit,
        noise=run["initial_noise"],
        clip_feat=run["siglip2_feat"],
        sync_feat=run["syncformer_feat"],
        text_feat=run["text_feat"],
        uncond_text_feat=run["uncond_text_feat"],
        steps=4,
        guidance_scale=4.5,
    )


# -- placement -------------------------------------------------------------------------------


def test_bf16_policy_keeps_listed_layers_in_fp32():
    dit = build_dit(tiny_config())
    report = apply_policy(dit, "bf16")
    assert report.kept_fp32 == ["time_in", "final_layer"]
    assert dit.time_in.mlp[0].weight.dtype == torch.float32
    assert dit.final_layer.linear.weight.dtype == torch.float32
    assert dit.single_blocks[0].linear_qkv.weight.dtype == torch.bfloat16
    assert dit.triple_blocks[0].audio_mod.linear.weight.dtype == torch.bfloat16
    assert dit.autocast_dtype == torch.bfloat16
    assert report.bytes_after < report.bytes_before


def test_empty_keep_list_is_the_official_all_bf16_model():
    dit = build_dit(tiny_config())
    report = apply_policy(dit, "bf16", keep_fp32=[])
    assert report.kept_fp32 == []
    dtypes = {p.dtype for n, p in dit.named_parameters() if not n.startswith("empty_")}
    assert dtypes == {torch.bfloat16}


def test_custom_keep_pattern_matches_every_block():
    dit = build_dit(tiny_config())
    report = apply_policy(dit, "fp16", keep_fp32=["single_blocks.*.modulation"])
    assert report.kept_fp32 == [f"single_blocks.{i}.modulation" for i in range(2)]
    assert dit.single_blocks[1].modulation.linear.weight.dtype == torch.float32
    assert dit.single_blocks[1].linear_qkv.weight.dtype == torch.float16


def test_fp8_policy_places_float8_weights_in_the_blocks_only():
    dit = build_dit(tiny_config())
    before = sum(p.numel() for p in dit.parameters())
    report = apply_policy(dit, "fp8")
    blk = dit.single_blocks[0]
    assert isinstance(blk.linear_qkv, Fp8Linear) and blk.linear_qkv.weight.dtype == torch.float8_e4m3fn
    assert isinstance(blk.linear1, Fp8TokenConv1d) and isinstance(blk.linear2.w1, Fp8TokenConv1d)
    assert isinstance(dit.triple_blocks[0].audio_mlp.fc1, Fp8Linear)
    # modulation producers and everything outside the blocks stay bf16 / fp32
    assert isinstance(blk.modulation.linear, nn.Linear) and blk.modulation.linear.weight.dtype == torch.bfloat16
    assert isinstance(dit.visual_proj.w1, nn.Linear)
    assert dit.final_layer.linear.weight.dtype == torch.float32
    # per triple block: 2 qkv, 2 self proj, 2 cross q, text kv, 2 cross proj, 2 MLPs x 2 = 13;
    # per single block: qkv, linear1, three ConvMLP convs = 5
    assert len(report.fp8) == 2 * 13 + 2 * 5
    assert blk.linear_qkv.quantize_input
    assert before > 0 and report.bytes_after < 0.5 * report.bytes_before


def test_fp8_weight_only_halves_block_weight_memory():
    dit16, dit8 = build_dit(tiny_config()), build_dit(tiny_config())
    apply_policy(dit16, "bf16")
    apply_policy(dit8, "fp8-weight-only")
    w16 = sum(p.numel() * p.element_size() for p in dit16.single_blocks.parameters())
    w8 = sum(t.numel() * t.element_size() for t in list(dit8.single_blocks.parameters()) + list(dit8.single_blocks.buffers()))
    assert w8 < 0.6 * w16
    assert not dit8.single_blocks[0].linear_qkv.quantize_input


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fp8-weight-only"):
        apply_policy(build_dit(tiny_config()), "int4")


def test_policies_list():
    assert POLICIES == ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")


# -- FP8 layers ------------------------------------------------------------------------------


def test_row_quantisation_round_trip():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4, per row in l2 well under that
    assert ((back - w).norm(dim=1) / w.norm(dim=1)).max() < 0.04


def test_fp8_linear_matches_fp32_within_quantisation_error():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(3, 50, 256)
    ref = lin(x)
    w8a8 = Fp8Linear(lin.weight.detach(), lin.bias, quantize_input=True, out_dtype=torch.float32)
    w8 = Fp8Linear(lin.weight.detach(), lin.bias, quantize_input=False, out_dtype=torch.float32)
    assert rel_l2(w8a8(x), ref) < 0.06
    assert rel_l2(w8(x), ref) < 0.04
    assert w8a8(x).shape == ref.shape


def test_fp8_fallback_is_the_quantised_product():
    """The CPU fallback computes exactly the product of the quantised operands (what _scaled_mm computes)."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    layer = Fp8Linear(lin.weight.detach(), lin.bias, quantize_input=True, out_dtype=torch.float32)
    x = torch.randn(10, 64)
    xq, xs = quantize_rows(x)
    expected = (xq.float() * xs[:, None]) @ (layer.weight.float() * layer.weight_scale[:, None]).t() + lin.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not round the operands
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_unfolds_into_an_exact_gemm(kernel):
    torch.manual_seed(2)
    conv = TokenConv1d(48, 40, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(2, 37, 48)
    layer = Fp8TokenConv1d(conv, quantize_input=True, out_dtype=torch.float32)
    w = conv.weight.detach().permute(0, 2, 1).reshape(40, kernel * 48)
    torch.testing.assert_close(layer.unfold(x) @ w.t(), conv(x), rtol=1e-5, atol=1e-5)
    assert rel_l2(layer(x), conv(x)) < 0.06


def test_even_or_strided_convs_are_refused():
    with pytest.raises(ValueError, match="odd-kernel"):
        Fp8TokenConv1d(nn.Conv1d(8, 8, 2, padding=1), True, torch.float32)


def test_keep_in_fp32_runs_fp32_under_autocast():
    torch.manual_seed(3)
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    ref = lin(x)
    keep_in_fp32(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nn.functional.linear(x.bfloat16().float(), lin.weight, lin.bias))
    assert "weight" in dict(lin.named_parameters())  # names (checkpoint keys) unchanged
    assert rel_l2(out, ref) < 1e-2


# -- fidelity on the conformance fixture ---------------------------------------------------------


@pytest.mark.parametrize(
    "precision, bound",
    [("fp32", 1e-5), ("bf16", 3e-2), ("fp16", 1e-2), ("fp8-weight-only", 6e-2), ("fp8", 8e-2)],
)
def test_policy_fidelity_on_the_fixture(fixtures_dir, run, precision, bound):
    dit = _fixture_dit(fixtures_dir)
    apply_policy(dit, precision)
    latents = _sample(dit, run)
    assert latents.dtype == torch.float32
    err = rel_l2(latents, run["final_latents_fp64"])
    assert err <= bound, f"{precision}: rel_l2 {err:.4g} > {bound}"
    if precision != "fp32":
        assert err > 1e-6  # the policy really changed the arithmetic
