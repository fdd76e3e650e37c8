"""DeSync scorer against the official Synchformer (tests/fixtures/scoring), CLAP score against
transformers' ClapModel, and best-of-N ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from foleyserve.fidelity_measures import rel_l2
from foleyserve.models.loading import CheckpointMismatchError
from foleyserve.models.sync_scorer import (
    SyncMelFrontEnd,
    SyncScorer,
    load_sync_scorer,
    offset_grid,
    resample,
    tiny_sync_scorer_config,
)
from foleyserve.models.synchformer import build_synchformer_visual, split_synchformer_state_dict
from foleyserve.scoring import Scorers, desync_from_features, desync_score, rank

HERE = Path(__file__).parent / "fixtures" / "scoring"
WEIGHTS = HERE / "tiny_synchformer_full_weights.safetensors"
TINY = tiny_sync_scorer_config(64)


@pytest.fixture(scope="module")
def fx():
    return load_file(HERE / "desync_6s.safetensors")


@pytest.fixture(scope="module")
def scorer():
    return load_sync_scorer(WEIGHTS, config=TINY)


@pytest.fixture(scope="module")
def visual():
    model = build_synchformer_visual(embed_dim=64, num_heads=2, depth=1).eval()
    model.load_state_dict(split_synchformer_state_dict(load_file(WEIGHTS))[0], strict=True)
    return model


def _frames(fx) -> np.ndarray:
    return fx["frames_small_uint8"].repeat_interleave(16, 1).repeat_interleave(16, 2).numpy()


def test_state_dict_matches_manifest(reference_dir):
    manifest = json.loads((reference_dir / "manifest-synchformer.json").read_text())
    with torch.device("meta"):
        model = SyncScorer()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {k: tuple(v[0]) for k, v in manifest["state_dict"].items() if v[2] != "visual"}
    assert ours == official


def test_strict_load_refuses_missing_and_extra_keys():
    sd = load_file(WEIGHTS)
    extra = {**sd, "transformer.extra": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError):
        load_sync_scorer(extra, config=TINY)
    missing = {k: v for k, v in sd.items() if k != "transformer.off_head.bias"}
    with pytest.raises(CheckpointMismatchError):
        load_sync_scorer(missing, config=TINY)


def test_resample_matches_torchaudio(fx):
    got = resample(fx["resample_in_48k"], 48000, 16000)
    assert got.shape == fx["resample_out_16k"].shape
    assert rel_l2(got, fx["resample_out_16k"]) <= 1e-6


def test_mel_front_end_matches_official(fx):
    spec = SyncMelFrontEnd()(fx["audio_16k"][None])
    assert spec.shape == (1, 17, 128, 66)
    assert rel_l2(spec[0, :2], fx["mel_norm_first2"]) <= 1e-5


def test_audio_features_match_official(fx, scorer):
    with torch.no_grad():
        afeat = scorer.audio_features(fx["audio_16k"][None])
    assert rel_l2(afeat, fx["afeat"]) <= 1e-5


def test_visual_tokens_match_official(fx, visual, scorer):
    scorers = Scorers(visual, scorer, None, None, None, None)
    from foleyserve.scoring import _visual_tokens

    vfeat = _visual_tokens(scorers, _frames(fx), None)
    assert rel_l2(vfeat, fx["vfeat"]) <= 1e-5


def test_logits_and_desync_match_official(fx, scorer):
    res = desync_from_features(scorer, fx["vfeat"], fx["afeat"])
    err = rel_l2(res["logits"][0], fx["logits"])
    print(f"offset logits rel_l2 vs official fp32: {err:.2e}, vs fp64: {rel_l2(res['logits'][0].double(), fx['logits_fp64']):.2e}")
    assert err <= 1e-5
    assert torch.equal(res["offsets_sec"][0], fx["offsets_sec"])
    assert float(res["desync"][0]) == float(fx["desync"][0])
    assert torch.equal(offset_grid(), fx["grid"])


def test_desync_end_to_end_from_frames_and_16k_audio(fx, visual, scorer):
    scorers = Scorers(visual, scorer, None, None, None, None)
    (res,) = desync_score(scorers, _frames(fx), fx["audio_16k"], sample_rate=16000)
    assert rel_l2(res["logits"], fx["logits"]) <= 1e-5
    assert res["offsets_sec"] == [float(x) for x in fx["offsets_sec"]]
    assert res["desync"] == float(fx["desync"][0])
    # The engine's [1, 8*S, D] sync features give the same scores without the frames.
    (again,) = desync_score(scorers, None, fx["audio_16k"], sample_rate=16000, sync_feat=fx["vfeat"].reshape(1, -1, 64))
    assert again["desync"] == res["desync"] and torch.allclose(again["logits"], res["logits"], atol=1e-6)


def test_short_clip_has_no_desync(fx, scorer):
    res = desync_from_features(scorer, fx["vfeat"][:, :13], fx["afeat"][:, :13])
    assert res["desync"] is None


def test_logits_depend_on_audio(fx, scorer):
    # Guards the fixture's power to catch a broken audio branch: other audio moves the logits.
    g = torch.Generator().manual_seed(0)
    other = fx["afeat"] + torch.randn(fx["afeat"].shape, generator=g)
    res = desync_from_features(scorer, fx["vfeat"], other)
    assert rel_l2(res["logits"][0], fx["logits"]) > 1e-3


# ----------------------------------------------------------------------------------- CLAP


def test_clap_score_matches_transformers_clap_model(tmp_path):
    from transformers import ClapConfig, ClapModel

    from foleyserve.models.clap_audio import load_clap_audio, tiny_clap_audio_config
    from foleyserve.models.encoders import clap_text_config, load_clap_text
    from foleyserve.pipeline.demo import demo_tokenizer
    from foleyserve.scoring import clap_audio_text_score

    tok = demo_tokenizer()
    text_cfg = clap_text_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tok), max_position_embeddings=130, projection_dim=48)
    cfg = ClapConfig(text_config=text_cfg.to_dict(), audio_config=tiny_clap_audio_config(48).to_dict(), projection_dim=48)
    torch.manual_seed(0)
    full = ClapModel(cfg).eval()
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    fe, audio = load_clap_audio(tmp_path)
    tokenizer, text = load_clap_text(tmp_path)
    scorers = Scorers(None, None, text, tokenizer, audio, fe)
    g = torch.Generator().manual_seed(1)
    wavs = 0.1 * torch.randn(2, 48000 * 3, generator=g)
    prompt = "footsteps on gravel"
    got = clap_audio_text_score(scorers, wavs, prompt)

    with torch.no_grad():
        feats = fe([w.numpy() for w in wavs], sampling_rate=48000, return_tensors="pt")
        a = full.get_audio_features(**feats).pooler_output
        t = full.get_text_features(**tok([prompt], return_tensors="pt")).pooler_output
    want = torch.nn.functional.cosine_similarity(a, t).tolist()
    assert got == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------------- ranking


def test_rank_orders_by_desync_then_clap_with_missing_last():
    cands = [
        {"index": 0, "desync": 0.4, "clap": 0.9},
        {"index": 1, "desync": 0.2, "clap": 0.1},
        {"index": 2, "desync": 0.2, "clap": 0.3},
        {"index": 3, "desync": None, "clap": 0.99},
    ]
    best, ranked = rank(cands)
    assert best["index"] == 2 and [c["index"] for c in ranked] == [2, 1, 0, 3]
    assert [c["rank"] for c in ranked] == [0, 1, 2, 3]
    best, _ = rank(cands, by=("clap",))
    assert best["index"] == 3
    with pytest.raises(ValueError):
        rank(cands, by=("loudness",))


# ----------------------------------------------------------------------------------- demo, CLI


@pytest.fixture(scope="module")
def demo():
    from foleyserve.pipeline.demo import demo_scorers

    return demo_scorers()


def test_score_candidates_with_engine_sync_features(demo):
    from foleyserve.scoring import score_candidates

    g = torch.Generator().manual_seed(2)
    sync_feat = torch.randn(1, 8 * 17, 32, generator=g)  # the engine's features of a 6 s clip
    wavs = 0.1 * torch.randn(3, 1, 48000 * 6, generator=g)  # dac.decode's [N, 1, n]
    scores = score_candidates(demo, None, wavs, "footsteps on gravel", sync_feat=sync_feat)
    assert [s["index"] for s in scores] == [0, 1, 2]
    for s in scores:
        assert all(any(abs(o - g) < 1e-6 for g in offset_grid().tolist()) for o in s["offsets_sec"])
        assert s["desync"] == pytest.approx(sum(abs(o) for o in s["offsets_sec"]) / 2)
        assert len(s["offsets_sec"]) == 2 and -1 <= s["clap"] <= 1
    # Scoring one at a time gives the same numbers as the batch.
    (one,) = score_candidates(demo, None, wavs[1], "footsteps on gravel", sync_feat=sync_feat)
    assert one["desync"] == scores[1]["desync"] and one["clap"] == pytest.approx(scores[1]["clap"], abs=1e-5)
    best, ranked = rank(scores)
    assert best["rank"] == 0 and len(ranked) == 3


def test_cli_score_demo_json(tmp_path, capsys):
    from foleyserve.cli import main
    from foleyserve.media import write_audio
    from foleyserve.pipeline.demo import sample_clip_path

    wav = tmp_path / "a.wav"
    write_audio(wav, 0.1 * np.random.default_rng(0).standard_normal(48000 * 4).astype(np.float32))
    assert main(["score", str(sample_clip_path()), str(wav), "--prompt", "rain", "--demo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["desync_sec"] is None  # the 3.96 s sample is shorter than one 4.8 s window
    assert -1 <= out["clap"] <= 1 and out["demo"] is True
    assert main(["score", str(sample_clip_path()), str(tmp_path / "missing.wav"), "--prompt", "x", "--demo"]) == 2
