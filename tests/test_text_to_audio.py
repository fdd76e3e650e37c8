"""Text to audio (no video, a duration) and variations (several seeds in one batch): engine and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foleyserve import Engine, GenerationRequest, RequestError
from foleyserve.cli import main
from foleyserve.pipeline import textonly
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.lengths import clip_lengths
from foleyserve.pipeline.variations import generate_variations, sample_output

FAST = ["--demo", "--steps", "2", "--loudness", "off"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


def text_request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"video": None, "duration": 2.0, "prompt": "rain on a tin roof", "steps": 2, "loudness": None, **kw})


def test_empty_visual_is_the_learned_vectors_at_the_durations_token_counts(engine: Engine) -> None:
    dit = engine.components.dit
    v = textonly.empty_visual(dit, 5.0, engine.device)
    n = clip_lengths(5.0)
    assert v.siglip.shape == (1, n["visual_len"], dit.config.clip_dim) and v.sync.shape == (1, n["sync_len"], dit.config.sync_feat_dim)
    assert v.frames_25fps == 125 and v.latent_length == 250 and v.siglip.dtype == torch.float32
    # Exactly what the unconditional branch uses (FoleyDiT.empty_visual).
    clip, sync = dit.empty_visual(1, n["visual_len"], n["sync_len"])
    assert torch.equal(v.siglip, clip.float()) and torch.equal(v.sync, sync.float())


def test_text_to_audio_shape_determinism_and_seed(engine: Engine) -> None:
    a = engine.generate(text_request(seed=5))
    assert a.waveform.shape == (1, 2 * 48000) and a.audio_seconds == 2.0 and a.video_seconds == 0.0
    assert torch.equal(a.waveform, engine.generate(text_request(seed=5)).waveform)
    assert not torch.equal(a.waveform, engine.generate(text_request(seed=6)).waveform)
    assert not torch.equal(a.waveform, engine.generate(text_request(seed=5, prompt="glass breaking")).waveform)


@pytest.mark.parametrize("kw, expect", [
    ({"duration": None}, "give duration"),
    ({"duration": 0.5}, "0.64 to 15"),
    ({"duration": 16.0}, "0.64 to 15"),
    ({"output": "x.mp4"}, "write .wav or .flac"),
    ({"start": 1.0}, "start applies to a video"),
])
def test_text_to_audio_refusals(kw, expect) -> None:
    with pytest.raises(RequestError, match=expect):
        text_request(**kw).validate()


def test_variations_run_as_one_batch_and_match_single_runs(engine: Engine, tmp_path: Path, monkeypatch) -> None:
    calls = []
    original = engine.sample_jobs
    monkeypatch.setattr(engine, "sample_jobs", lambda jobs, **kw: calls.append(len(jobs)) or original(jobs, **kw))
    req = GenerationRequest(video=str(sample_clip_path()), prompt="rain", steps=2, loudness=None, output=tmp_path / "v.wav")
    results = generate_variations(engine, req, [3, 7, 11])
    assert calls == [3]  # one denoising loop for all three
    assert [r.seed for r in results] == [3, 7, 11]
    assert [f.name for r in results for f in r.files] == ["v_seed3.wav", "v_seed7.wav", "v_seed11.wav"]
    single = engine.generate(GenerationRequest(video=str(sample_clip_path()), prompt="rain", steps=2, loudness=None, seed=7))
    torch.testing.assert_close(results[1].waveform, single.waveform, atol=1e-4, rtol=0)
    assert sample_output(None, 3) is None


def test_cli_text_to_audio(tmp_path: Path, capsys) -> None:
    import av

    out = tmp_path / "rain.wav"
    assert main(["generate", "--prompt", "rain", "--duration", "1.6", "--out", str(out), *FAST]) == 0
    with av.open(str(out)) as c:
        frames = list(c.decode(audio=0))
    assert frames[0].sample_rate == 48000 and sum(f.samples for f in frames) == int(1.6 * 48000)


def test_cli_text_to_audio_refusals(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--prompt", "rain", *FAST]) == 2
    assert "--duration SECONDS for text to audio" in capsys.readouterr().err
    assert main(["generate", "--prompt", "rain", "--duration", "2", "--out", str(tmp_path / "x.mp4"), *FAST]) == 2
    assert "write .wav or .flac" in capsys.readouterr().err
    assert main(["generate", "--prompt", "rain", "--duration", "30", "--out", str(tmp_path / "x.wav"), *FAST]) == 2
    assert "0.64 to 15" in capsys.readouterr().err


def test_cli_variations_write_one_file_per_seed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.wav"
    assert main(["generate", str(sample_clip_path()), "--seeds", "4,9", "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v_seed4.wav", "v_seed9.wav"]
    assert capsys.readouterr().out.count("wrote ") == 2
    assert main(["generate", "--prompt", "x", "--duration", "1", "--num-samples", "2", "--seed", "5",
                 "--out", str(tmp_path / "t.flac"), *FAST]) == 0
    assert (tmp_path / "t_seed5.flac").is_file() and (tmp_path / "t_seed6.flac").is_file()


def test_variations_of_an_mp4_keep_the_original_sound(tmp_path: Path) -> None:
    # The shared encoder run writes nothing, so it must not check the kept-original mix either.
    out = tmp_path / "v.mp4"
    assert main(["generate", str(sample_clip_path()), "--num-samples", "2", "--keep-original-audio", "0.5",
                 "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v_seed0.mp4", "v_seed1.mp4"]


def test_cli_variation_flag_refusals(tmp_path: Path, capsys) -> None:
    clip = str(sample_clip_path())
    assert main(["generate", clip, "--seeds", "1,x", *FAST]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["generate", clip, "--seeds", "1,2", "--num-samples", "2", *FAST]) == 2
    assert "do not combine" in capsys.readouterr().err
    assert main(["generate", clip, "--num-samples", "99", *FAST]) == 2
    assert "1 to 16" in capsys.readouterr().err
