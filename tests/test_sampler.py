"""Scheduler tables and the full 4-step CFG sampling run against the official loop."""


import pytest
import torch
from safetensors.torch import load_file

from conftest import load_fixture_model
from foleyserve.fidelity_measures import max_abs, rel_l2
from foleyserve.models import build_dac, build_dit
from foleyserve.pipeline.sampler import cfg_inputs, flow_match_schedule, initial_noise, sample_latents


def _load(path, builder, **kw):
    return load_fixture_model(path, builder, **kw)


@pytest.fixture(scope="module")
def run(fixtures_dir):
    return load_file(str(fixtures_dir / "sampling_2s_cfg4.5_4steps.safetensors"))


@pytest.fixture(scope="module")
def dit(fixtures_dir):
    return _load(fixtures_dir / "tiny_foley_weights.safetensors", build_dit)


def _features(run):
    return dict(
        clip_feat=run["siglip2_feat"],
        sync_feat=run["syncformer_feat"],
        text_feat=run["text_feat"],
        uncond_text_feat=run["uncond_text_feat"],
    )


@pytest.mark.parametrize("steps", [50, 25, 4])
def test_schedule_tables_are_exact(fixtures_dir, steps):
    ref = load_file(str(fixtures_dir / "scheduler.safetensors"))
    sched = flow_match_schedule(steps)
    assert sched.timesteps.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
    assert torch.equal(sched.timesteps, ref[f"timesteps_{steps}"])
    assert torch.equal(sched.sigmas, ref[f"sigmas_{steps}"])


def test_schedule_of_the_run(run):
    sched = flow_match_schedule(4)
    assert torch.equal(sched.timesteps, run["timesteps"]) and torch.equal(sched.sigmas, run["sigmas"])


def test_shifted_schedule_keeps_endpoints():
    sched = flow_match_schedule(10, shift=3.0)
    assert sched.sigmas[0] == 1 and sched.sigmas[-1] == 0
    assert torch.all(sched.sigmas[1:-1] > flow_match_schedule(10).sigmas[1:-1])
    with pytest.raises(ValueError):
        flow_match_schedule(0)


def test_cfg_inputs_are_uncond_first_with_learned_empty_visuals(run, dit):
    clip, sync, text = cfg_inputs(dit, **_features(run), batch=1, guidance=True)
    assert torch.equal(clip, run["model_in_clip_feat_step0"])
    assert torch.equal(sync, run["model_in_sync_feat_step0"])
    assert torch.equal(text, run["model_in_cond_step0"])


def test_sampling_matches_official_loop(run, dit):
    seen = []
    latents = sample_latents(
        dit,
        noise=run["initial_noise"],
        **_features(run),
        steps=4,
        guidance_scale=4.5,
        callback=lambda i, n, x: seen.append((i, n, x.clone())),
    )
    assert [(i, n) for i, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for (i, _, x), ref in zip(seen, run["latents_after_step"]):
        assert rel_l2(x, ref) <= 1e-5, f"step {i}"
    assert max_abs(latents, run["final_latents"]) <= 1e-4
    assert rel_l2(latents, run["final_latents"]) <= 1e-5
    assert rel_l2(latents, run["final_latents_fp64"]) <= 1e-5


def test_sampled_latents_decode_to_official_audio(fixtures_dir, run):
    dac = _load(fixtures_dir / "tiny_dac_weights.safetensors", build_dac)
    with torch.no_grad():
        audio = dac.decode(run["final_latents"])
    assert audio.shape == run["audio"].shape == (1, 1, 96000)
    assert max_abs(audio, run["audio"]) <= 1e-4
    assert rel_l2(audio, run["audio"]) <= 1e-5


def test_end_to_end_latents_and_audio(fixtures_dir, run, dit):
    dac = _load(fixtures_dir / "tiny_dac_weights.safetensors", build_dac)
    latents = sample_latents(dit, noise=run["initial_noise"], **_features(run), steps=4, guidance_scale=4.5)
    with torch.no_grad():
        audio = dac.decode(latents)
    assert max_abs(audio, run["audio"]) <= 1e-4
    assert rel_l2(audio, run["audio"]) <= 1e-5
    assert rel_l2(audio, run["audio_fp64"]) <= 1e-5


def test_bf16_sampling_within_official_bf16_error(fixtures_dir, run):
    dit16 = _load(fixtures_dir / "tiny_foley_weights.safetensors", build_dit, dtype=torch.bfloat16)
    latents = sample_latents(dit16, noise=run["initial_noise"], **_features(run), steps=4, guidance_scale=4.5)
    assert latents.dtype == torch.float32
    assert rel_l2(latents, run["final_latents_fp64"]) <= 3e-2


def test_no_guidance_runs_only_the_conditional_rows(run, dit):
    calls = []
    original = dit.predict_flow

    def spy(x, t, c, *rest):
        calls.append(x.shape[0])
        return original(x, t, c, *rest)

    dit.predict_flow = spy
    try:
        out = sample_latents(dit, noise=run["initial_noise"], **_features(run), steps=2, guidance_scale=1.0)
    finally:
        del dit.predict_flow
    assert calls == [1, 1]
    assert out.shape == run["initial_noise"].shape


def test_batched_noise_shares_features(run, dit):
    noise = torch.cat([run["initial_noise"], initial_noise(1, 100, seed=5)])
    both = sample_latents(dit, noise=noise, **_features(run), steps=4, guidance_scale=4.5)
    assert max_abs(both[0:1], run["final_latents"]) <= 1e-4


def test_mismatched_text_lengths_are_refused(run, dit):
    feats = _features(run)
    feats["uncond_text_feat"] = feats["uncond_text_feat"][:, :5]
    with pytest.raises(ValueError, match="padded to one length"):
        sample_latents(dit, noise=run["initial_noise"], **feats, steps=1)


def test_initial_noise_is_seeded_float32():
    a, b, c = initial_noise(2, 50, seed=7), initial_noise(2, 50, seed=7), initial_noise(2, 50, seed=8)
    assert a.dtype == torch.float32 and a.shape == (2, 128, 50)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A seed's noise does not depend on the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(initial_noise(2, 50, seed=7), a)


def test_seeds_past_32_bits_give_their_own_noise():
    # torch's CPU generator keeps a seed's low 32 bits: without care 2**32 + 7 would replay seed 7.
    below = torch.randn((1, 128, 50), generator=torch.Generator().manual_seed(7))
    assert torch.equal(initial_noise(1, 50, seed=7), below)  # the official noise, unchanged
    big = initial_noise(1, 50, seed=2**32 + 7)
    assert not torch.equal(big, below) and not torch.equal(big, initial_noise(1, 50, seed=2**33 + 7))
    assert torch.equal(big, initial_noise(1, 50, seed=2**32 + 7)) and big.dtype == torch.float32
    top = initial_noise(2, 64, seed=2**63 - 1)
    assert top.shape == (2, 128, 64) and abs(float(top.std()) - 1) < 0.05
