"""Precision policies: layer placement, FP8 layers against float32, policy fidelity on the fixture."""

import copy
import threading

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import load_fixture_model
from foleyserve.fidelity_measures import rel_l2
from foleyserve.models import build_dit
from foleyserve.models.dit import tiny_config, xxl_config
from foleyserve.models.layers import ConvMLP, TapLinear, TokenConv1d, rope_operands, shifted_tap_sum
from foleyserve.pipeline.sampler import sample_latents
from foleyserve.precision import (
    POLICIES,
    Fp8Linear,
    Fp8TapLinear,
    apply_policy,
    keep_in_fp32,
    quantize_rows,
    weight_bytes_report,
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
    assert report.fused  # the tap (inference) layout: linear1, w13 = [w1 | w3] and w2 are tap GEMMs
    assert isinstance(blk.linear1, Fp8TapLinear) and blk.linear1.kernel_size == 3
    assert isinstance(blk.linear2.w13, Fp8TapLinear) and isinstance(blk.linear2.w2, Fp8TapLinear)
    assert not hasattr(blk.linear2, "w1")
    assert isinstance(dit.triple_blocks[0].audio_mlp.fc1, Fp8Linear)
    # the single blocks' per-token modulation and everything outside the blocks stay bf16 / fp32;
    # the triple blocks' modulation (one time vector per row) goes to float8
    assert isinstance(blk.modulation.linear, nn.Linear) and blk.modulation.linear.weight.dtype == torch.bfloat16
    assert isinstance(dit.triple_blocks[0].audio_mod.linear, Fp8Linear)
    assert isinstance(dit.visual_proj.w1, nn.Linear)
    assert dit.final_layer.linear.weight.dtype == torch.float32
    # per triple block: 2 modulations, 2 qkv, 2 self proj, 2 cross q, text kv, 2 cross proj,
    # 2 MLPs x 2 = 15; per single block: qkv, linear1, the ConvMLP's w13 and w2 = 4
    assert len(report.fp8) == 2 * 15 + 2 * 4
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


# -- tap GEMMs (k=3 token convolutions) in float8 ------------------------------------------------


def _dequantised_operands(layer: Fp8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact operands an fp8 product multiplies, in float64: per-token-scaled x, per-row-scaled W."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    xd = (xq.double() * xs.double()[:, None]).view(x.shape)
    return xd, layer.weight.double() * layer.weight_scale.double()[:, None]


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_tap_linear_is_the_shifted_sum_of_the_quantised_product(bias):
    torch.manual_seed(2)
    conv = TokenConv1d(48, 40, 3, padding=1, bias=bias)
    layer = Fp8TapLinear.from_tap(TapLinear.from_convs(conv), quantize_input=True, out_dtype=torch.float32)
    x = torch.randn(2, 37, 48)
    out = layer(x)
    xq, xs = quantize_rows(x.reshape(-1, 48))
    p = (xq.float() * xs[:, None]) @ (layer.weight.float() * layer.weight_scale[:, None]).t()
    expected = shifted_tap_sum(p.view(2, 37, -1), 3, conv.bias.detach() if bias else None)
    # The same fp32 operands through the same kind of fp32 GEMM and shifted sum: only the order of
    # fp32 accumulation may differ, a few ulps of sums of 48 and 3 terms (~1e-7 relative).
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # And it IS the convolution of the quantised operands (float64 conv): each token's activation
    # scale stays with that token, since the shift happens after the scaled product.
    xd, wd = _dequantised_operands(layer, x)
    w_conv = wd.view(3, 40, 48).permute(1, 2, 0)  # tap-major rows -> [Cout, Cin, k]
    ref = F.conv1d(xd.transpose(1, 2), w_conv, conv.bias.double() if bias else None, padding=1).transpose(1, 2)
    assert rel_l2(out, ref) < 1e-6  # fp32 rounding of the products and sums only


@pytest.mark.parametrize("kernel", [1, 3])
def test_fp8_tap_linear_matches_the_conv_within_fp8_error(kernel):
    torch.manual_seed(3)
    conv = TokenConv1d(48, 40, kernel, padding=kernel // 2, bias=True)
    x = torch.randn(2, 37, 48)
    tap = TapLinear.from_convs(conv)
    # e4m3 keeps 3 mantissa bits: ~2-3 % per quantised operand in l2, as for Fp8Linear.
    assert rel_l2(Fp8TapLinear.from_tap(tap, True, torch.float32)(x), conv(x)) < 0.06
    assert rel_l2(Fp8TapLinear.from_tap(tap, False, torch.float32)(x), conv(x)) < 0.04


def test_fused_w13_equals_separate_w1_and_w3_quantised_the_same_way():
    torch.manual_seed(4)
    mlp = ConvMLP(64, 4 * 64, kernel_size=3)
    x = torch.randn(2, 29, 64)
    kw = dict(quantize_input=True, out_dtype=torch.float32)
    w1 = Fp8TapLinear.from_tap(TapLinear.from_convs(mlp.w1), **kw)
    w3 = Fp8TapLinear.from_tap(TapLinear.from_convs(mlp.w3), **kw)
    mlp.fuse()
    w13 = Fp8TapLinear.from_tap(mlp.w13, **kw)
    # Row scales are per (tap, output channel) either way, so the stacked weight holds the same
    # bytes and scales; the input is quantised once per token in both.
    hidden = w1.out_features
    stacked = w13.weight.view(3, 2, hidden, 64)
    assert torch.equal(stacked[:, 0].reshape(-1, 64).view(torch.uint8), w1.weight.view(torch.uint8))
    assert torch.equal(stacked[:, 1].reshape(-1, 64).view(torch.uint8), w3.weight.view(torch.uint8))
    h1, h3 = w13(x).chunk(2, dim=-1)
    torch.testing.assert_close(h1, w1(x), rtol=1e-6, atol=1e-6)  # fp32 accumulation order only
    torch.testing.assert_close(h3, w3(x), rtol=1e-6, atol=1e-6)


class _OneConv(nn.Module):
    """A model with no fuse_for_inference: apply_policy makes its tap GEMM itself."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = TokenConv1d(16, 32, kernel, padding=kernel // 2)


def test_models_without_fuse_get_tap_gemms_and_even_kernels_are_refused():
    torch.manual_seed(5)
    model = _OneConv(3)
    x = torch.randn(1, 9, 16)
    ref = model.conv(x)
    report = apply_policy(model, "fp8", fp8_layers=["conv"], keep_fp32=[])
    assert not report.fused and report.fp8 == ["conv"] and isinstance(model.conv, Fp8TapLinear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_l2(model.conv(x), ref) < 0.06
    with pytest.raises(ValueError, match="odd-kernel"):
        apply_policy(_OneConv(2), "fp8", fp8_layers=["conv"])


def test_every_policy_runs_the_fused_inference_layout():
    for precision in POLICIES:
        dit = build_dit(tiny_config())
        report = apply_policy(dit, precision)
        assert report.fused and report.as_dict()["fused"] is True, precision
        blk = dit.single_blocks[0]
        assert isinstance(blk.linear1, TapLinear | Fp8TapLinear) and hasattr(blk.linear2, "w13"), precision
    again = apply_policy(dit, "fp8-weight-only")  # idempotent: float8 layers are not converted twice
    assert again.fp8 == [] and isinstance(blk.linear2.w13, Fp8TapLinear)


# -- fp8-weight-only: one reused dequantisation buffer -------------------------------------------


def test_fp8_weight_only_dequantises_into_one_shared_buffer():
    dit = build_dit(tiny_config())
    apply_policy(dit, "fp8-weight-only")
    layers = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    scratch = layers[0].scratch
    assert len(layers) == 2 * 15 + 2 * 4 and all(m.scratch is scratch for m in layers)
    assert scratch.numel == max(m.weight.numel() for m in layers)
    ptrs = set()
    for m in layers:
        w = m._dequantized_in_scratch(torch.bfloat16)
        # bit for bit the reference (q * scale in fp32, rounded once to bf16)
        assert torch.equal(w.view(torch.int16), m.dequantized_weight(torch.bfloat16).view(torch.int16))
        ptrs.add(w.data_ptr())
    assert len(ptrs) == 1  # every layer wrote the same memory
    # each thread has a buffer of its own (the batcher's threads may run layers concurrently)
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(scratch.get((8,), torch.bfloat16, torch.device("cpu")).data_ptr()))
    t.start()
    t.join()
    assert other and other[0] not in ptrs
    # a deep copy (as the fidelity command makes) gets one fresh pool, shared by all its layers
    copy_layers = [m for m in copy.deepcopy(dit).modules() if isinstance(m, Fp8Linear)]
    pools = {id(m.scratch) for m in copy_layers}
    assert len(pools) == 1 and copy_layers[0].scratch is not scratch and copy_layers[0].scratch.numel == scratch.numel


def test_fp8_weight_only_layers_match_the_dequantised_reference_bit_for_bit():
    torch.manual_seed(6)
    dit = build_dit(tiny_config())
    apply_policy(dit, "fp8-weight-only")
    tap, lin = dit.single_blocks[0].linear2.w13, dit.single_blocks[0].linear_qkv
    x = torch.randn(2, 11, 128).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tap(x), shifted_tap_sum(F.linear(x, tap.dequantized_weight(torch.bfloat16)), 3, tap.bias))
        assert torch.equal(lin(x), F.linear(x, lin.dequantized_weight(torch.bfloat16), lin.bias))


@pytest.mark.parametrize("precision", ["fp8", "fp8-weight-only"])
def test_fp8_blocks_compile_without_graph_breaks(precision):
    import torch._dynamo

    torch.manual_seed(7)
    dit = build_dit(tiny_config())
    apply_policy(dit, precision)
    blk, mlp = dit.single_blocks[0], dit.triple_blocks[0].audio_mlp
    n = 12
    x, mod_in = torch.randn(2, n, 128), torch.randn(2, n, 128)
    rope = rope_operands(torch.arange(n, dtype=torch.float32), 64, "cpu")

    def step(x: torch.Tensor, mod_in: torch.Tensor) -> torch.Tensor:
        # One attention backend for both runs: eager picks CPU flash attention, while AOT's
        # decomposition computes the math form, which rounds bf16 differently.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            return mlp(blk(x, mod_in, rope))

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, mod_in)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    # the compiled form dequantises functionally instead of into the scratch: the same bits
    torch.testing.assert_close(compiled(x, mod_in), step(x, mod_in), rtol=0, atol=0)
    torch._dynamo.reset()


# -- weight bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [tiny_config, xxl_config])
def test_weight_bytes_are_counted_without_allocating(config):
    report = weight_bytes_report(config())
    sizes = report["bytes"]
    meta = build_dit(config(), dtype=torch.bfloat16, device="meta")
    apply_policy(meta, "fp8")
    fp8 = [m for m in meta.modules() if isinstance(m, Fp8Linear)]
    # each float8 layer: 1 byte per weight instead of 2, plus a 4-byte scale per output row
    saved = sum(m.weight.numel() for m in fp8) - 4 * sum(m.weight_scale.numel() for m in fp8)
    assert sizes["bf16"] - sizes["fp8"] == saved
    assert sizes["fp8-weight-only"] == sizes["fp8"]
    assert report["ratio_to_bf16"]["fp8"] == sizes["fp8"] / sizes["bf16"]


def test_xxl_fp8_weight_bytes():
    """XXL: 10.28 GB of bf16 weights. The default fp8 policy keeps the single blocks' per-token
    modulation in bf16, which leaves 0.555x (the issue's bound is 0.6x); keeping every modulation
    producer in bf16 gives 0.629x, putting them all in float8 0.506x."""
    default = weight_bytes_report(xxl_config())
    assert default["bytes"]["bf16"] == 10_283_380_736
    assert 0.55 < default["ratio_to_bf16"]["fp8"] < 0.56 <= 0.6
    all_bf16 = weight_bytes_report(xxl_config(), policies=("bf16", "fp8"), fp8_exclude=["*.audio_mod.linear", "*.v_cond_mod.linear", "*.modulation.linear"])
    assert 0.62 < all_bf16["ratio_to_bf16"]["fp8"] < 0.63
    everything = weight_bytes_report(xxl_config(), policies=("bf16", "fp8"), fp8_exclude=[])
    assert everything["ratio_to_bf16"]["fp8"] < 0.51


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
