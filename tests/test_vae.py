"""DAC-VAE conformance against the official implementation (fixture section 4 of the README)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foleyserve.fidelity_measures import max_abs, rel_l2
from foleyserve.models.vae import DAC, build_dac, dac_from_checkpoint

# README "Tolerances": float32 implementation vs the official float32 output on CPU.
MAX_ABS, REL_L2 = 1e-4, 1e-5


def _tiny_kwargs(fixtures_dir: Path) -> dict:
    with safe_open(str(fixtures_dir / "tiny_dac_weights.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture(scope="module")
def tiny_sd(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "tiny_dac_weights.safetensors"))


@pytest.fixture(scope="module")
def tiny_dac(fixtures_dir: Path, tiny_sd: dict[str, torch.Tensor]) -> DAC:
    model = build_dac(_tiny_kwargs(fixtures_dir))
    model.load_state_dict(tiny_sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "dac_decode.safetensors"))


def _check(name: str, got: torch.Tensor, want: torch.Tensor, want64: torch.Tensor | None = None) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    m, r = max_abs(got, want), rel_l2(got, want)
    line = f"{name}: vs official fp32 max_abs={m:.3g} rel_l2={r:.3g}"
    if want64 is not None:
        line += f" | vs fp64 max_abs={max_abs(got, want64):.3g} rel_l2={rel_l2(got, want64):.3g}"
    print(line)
    assert m <= MAX_ABS and r <= REL_L2, line


def test_decode_matches_official(tiny_dac: DAC, ref: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        audio = tiny_dac.decode(ref["z"])
    assert audio.shape == (2, 1, 25 * tiny_dac.hop_length)
    _check("decode", audio, ref["audio"], ref["audio_fp64"])
    # The same bound against the float64 reference: our fp32 error must be of fp32-noise size.
    assert max_abs(audio, ref["audio_fp64"]) <= MAX_ABS
    assert rel_l2(audio, ref["audio_fp64"]) <= REL_L2


def test_decode_fp64_matches_fp64_reference(fixtures_dir: Path, tiny_sd, ref) -> None:
    model = build_dac(_tiny_kwargs(fixtures_dir))
    model.load_state_dict(tiny_sd, strict=True)
    model = model.double().eval()
    with torch.no_grad():
        audio = model.decode(ref["z"].double())
    m, r = max_abs(audio, ref["audio_fp64"]), rel_l2(audio, ref["audio_fp64"])
    print(f"decode fp64 vs official fp64: max_abs={m:.3g} rel_l2={r:.3g}")
    assert m <= 1e-9 and r <= 1e-10


def test_encode_matches_official(tiny_dac: DAC, ref: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        mean, logvar = tiny_dac.encode(ref["enc_audio_in"])
    _check("encode mean", mean, ref["enc_mean"])
    _check("encode logvar", logvar, ref["enc_logvar"])


def test_encode_fp32_vs_own_fp64(fixtures_dir: Path, tiny_sd, tiny_dac: DAC, ref) -> None:
    # The fixture has no fp64 encoder output, so the fp64 run of this module stands in for it.
    model = build_dac(_tiny_kwargs(fixtures_dir))
    model.load_state_dict(tiny_sd, strict=True)
    model = model.double().eval()
    with torch.no_grad():
        mean64, logvar64 = model.encode(ref["enc_audio_in"].double())
        mean, logvar = tiny_dac.encode(ref["enc_audio_in"])
    for name, a, b in (("mean", mean, mean64), ("logvar", logvar, logvar64)):
        m, r = max_abs(a, b), rel_l2(a, b)
        print(f"encode {name} fp32 vs fp64: max_abs={m:.3g} rel_l2={r:.3g}")
        assert m <= MAX_ABS and r <= REL_L2
    assert max_abs(mean64, ref["enc_mean"]) <= MAX_ABS


def test_logvar_is_clamped(tiny_dac: DAC) -> None:
    # Push the log-variance half of quant_conv far out of range through its bias.
    model = copy.deepcopy(tiny_dac)
    with torch.no_grad():
        model.quant_conv.bias[model.latent_dim :: 2].fill_(1e4)
        model.quant_conv.bias[model.latent_dim + 1 :: 2].fill_(-1e4)
        _, logvar = model.encode(torch.zeros(1, 1, model.hop_length))
    assert logvar[:, 0::2].eq(20.0).all() and logvar[:, 1::2].eq(-30.0).all()


def test_state_dict_matches_manifest(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "manifest-dac-vae.json").read_text())
    with torch.device("meta"):
        model = build_dac(manifest["constructor_kwargs_used"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: shape for k, (shape, _dtype) in manifest["state_dict"].items()}
    assert len(ours) == manifest["num_tensors"] == len(official)
    assert sorted(set(ours) ^ set(official)) == []
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]
    assert all(p.is_meta for p in model.parameters())
    assert (model.sample_rate, model.hop_length, model.latent_dim) == (48000, 960, 128)


def test_tiny_attributes(tiny_dac: DAC) -> None:
    assert (tiny_dac.sample_rate, tiny_dac.hop_length, tiny_dac.latent_dim) == (48000, 960, 128)
    assert isinstance(tiny_dac.hop_length, int)


def test_fold_weight_norm(fixtures_dir: Path, tiny_sd, tiny_dac: DAC, ref) -> None:
    model = build_dac(_tiny_kwargs(fixtures_dir))
    model.load_state_dict(tiny_sd, strict=True)
    assert model.fold_weight_norm() is model
    keys = model.state_dict().keys()
    assert not any(k.endswith(("weight_g", "weight_v")) for k in keys)
    assert "decoder.model.1.block.1.weight" in keys
    assert isinstance(model.decoder.model[1].block[1], torch.nn.ConvTranspose1d)
    with torch.no_grad():
        a_fold, a_wn = model.decode(ref["z"]), tiny_dac.decode(ref["z"])
        (m_fold, _), (m_wn, _) = model.encode(ref["enc_audio_in"]), tiny_dac.encode(ref["enc_audio_in"])
    print(f"fold: decode max_abs={max_abs(a_fold, a_wn):.3g}, encode mean max_abs={max_abs(m_fold, m_wn):.3g}")
    assert max_abs(a_fold, a_wn) <= 1e-5 and rel_l2(a_fold, a_wn) <= 1e-6
    assert rel_l2(m_fold, m_wn) <= 1e-6
    _check("decode folded", a_fold, ref["audio"])


def test_weight_norm_is_per_input_channel_for_transposed_conv(tiny_dac: DAC) -> None:
    conv = tiny_dac.decoder.model[1].block[1]
    w = conv.weight()
    norms = w.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, conv.weight_g.detach().abs().flatten(), rtol=1e-5, atol=0)


def test_dac_from_checkpoint(fixtures_dir: Path, tiny_sd, ref) -> None:
    kwargs = {**_tiny_kwargs(fixtures_dir), "n_codebooks": 9, "codebook_size": 1024,
              "codebook_dim": 8, "quantizer_dropout": False}
    model = dac_from_checkpoint({"state_dict": dict(tiny_sd), "metadata": {"kwargs": kwargs}})
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        _check("decode via dac_from_checkpoint", model.decode(ref["z"]), ref["audio"])


def test_dac_from_checkpoint_reports_mismatches(fixtures_dir: Path, tiny_sd) -> None:
    kwargs = _tiny_kwargs(fixtures_dir)
    sd = dict(tiny_sd)
    del sd["decoder.model.7.weight_v"]
    sd["quantizer.quantizers.0.codebook.weight"] = torch.zeros(1024, 8)
    sd["post_quant_conv.weight"] = torch.zeros(128, 64, 1)
    with pytest.raises(ValueError) as info:
        dac_from_checkpoint({"state_dict": sd, "metadata": {"kwargs": kwargs}})
    msg = str(info.value)
    assert "missing keys (1): decoder.model.7.weight_v" in msg
    assert "unexpected keys (1): quantizer.quantizers.0.codebook.weight" in msg
    assert "post_quant_conv.weight checkpoint [128, 64, 1] vs model [128, 128, 1]" in msg

    with pytest.raises(ValueError, match="not a DAC checkpoint"):
        dac_from_checkpoint({"state_dict": sd})


def test_bad_kwargs(fixtures_dir: Path) -> None:
    kwargs = _tiny_kwargs(fixtures_dir)
    with pytest.raises(ValueError, match="continuous"):
        build_dac({**kwargs, "continuous": False})
    no_flag = dict(kwargs)
    del no_flag["continuous"]  # the official default is the discrete codec
    with pytest.raises(ValueError, match="continuous"):
        build_dac(no_flag)
    with pytest.raises(ValueError, match="unknown DAC kwargs"):
        build_dac({**kwargs, "decoder_channels": 64})
    with pytest.raises(ValueError, match="different products"):
        build_dac({**kwargs, "decoder_rates": [8, 5, 4, 3, 4]})
    # Quantizer-only kwargs of the official constructor are accepted and ignored.
    with torch.device("meta"):
        model = build_dac({**kwargs, "n_codebooks": 9, "codebook_size": 1024, "codebook_dim": 8,
                           "quantizer_dropout": False})
    assert not any("quantizer." in k for k in model.state_dict())


# ----------------------------------------------------------------------------- decoder only


def test_decoder_only_loads_the_official_weights_and_decodes_identically(fixtures_dir, tiny_sd, tiny_dac, ref, caplog) -> None:
    from foleyserve.models.vae import ENCODER_PREFIXES

    kwargs = _tiny_kwargs(fixtures_dir)
    n_encoder = sum(k.startswith(ENCODER_PREFIXES) for k in tiny_sd)
    assert n_encoder > 0
    with caplog.at_level("INFO", logger="foleyserve.models.vae"):
        model = dac_from_checkpoint({"state_dict": dict(tiny_sd), "metadata": {"kwargs": kwargs}}, decoder_only=True)
    assert f"{n_encoder} encoder tensors" in caplog.text
    assert model.encoder is None and model.quant_conv is None and model.decoder_only
    assert set(model.state_dict()) == {k for k in tiny_sd if not k.startswith(ENCODER_PREFIXES)}
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model.decode(ref["z"]), tiny_dac.decode(ref["z"]))
    with pytest.raises(RuntimeError, match="decoder_only"):
        model.encode(ref["enc_audio_in"])
    # the decoder keys are still loaded strictly
    sd = dict(tiny_sd)
    del sd["decoder.model.7.weight_v"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.model.7.weight_v"):
        dac_from_checkpoint({"state_dict": sd, "metadata": {"kwargs": kwargs}}, decoder_only=True)


def test_decoder_only_build_leaves_out_the_encoder_side(fixtures_dir) -> None:
    kwargs = _tiny_kwargs(fixtures_dir)
    with torch.device("meta"):
        full, dec = build_dac(kwargs), build_dac(kwargs, decoder_only=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dec) == count(full) - count(full.encoder) - count(full.quant_conv)
    assert dec.hop_length == full.hop_length and dec.latent_dim == full.latent_dim
    assert set(full.drop_encoder().state_dict()) == set(dec.state_dict())


def test_inference_models_carry_no_encoder() -> None:
    from foleyserve.pipeline.demo import demo_components
    from foleyserve.pipeline.random_models import OFFICIAL_DAC_KWARGS, random_dac

    assert demo_components(torch.device("cpu")).dac.encoder is None
    assert random_dac(device="meta").encoder is None
    with torch.device("meta"):
        assert build_dac(OFFICIAL_DAC_KWARGS).encoder is not None  # the full model stays available
