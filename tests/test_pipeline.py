"""The staged pipeline and the Engine API, end to end on the demo model and with fixture weights."""


import av
import pytest
import torch
from safetensors.torch import load_file

from conftest import load_fixture_model
from foleyserve.fidelity_measures import max_abs, rel_l2
from foleyserve.models import build_dac, build_dit
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.features import TextFeatures, VisualFeatures
from foleyserve.pipeline.pipeline import Components, Engine, resolve_device, resolve_precision
from foleyserve.pipeline.requests import GenerationRequest, RequestError
from foleyserve.pipeline.sampler import initial_noise


@pytest.fixture(scope="module")
def demo_engine():
    return Engine.demo()


@pytest.fixture(scope="module")
def demo_result(demo_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "sample_foley.mp4"
    req = GenerationRequest(video=sample_clip_path(), prompt="a ball bouncing", steps=3, seed=11, output=out)
    return demo_engine.generate(req)


def test_sample_clip_is_small_and_bundled():
    p = sample_clip_path()
    assert p.is_file() and p.stat().st_size < 500_000


def test_demo_generates_a_playable_mp4(demo_result):
    res = demo_result
    assert res.sample_rate == 48000
    # 4 s at 25 fps gives 99 frames by the official sampling rule -> 3.96 s -> 198 latents
    assert res.waveform.shape == (1, 198 * 960)
    assert res.audio_seconds == pytest.approx(3.96)
    assert res.waveform.abs().max() <= 1.0 and res.waveform.std() > 1e-3
    assert any("demo model" in w for w in res.warnings)
    for stage in ("decode", "siglip2", "synchformer", "clap", "dit", "dac", "write"):
        assert res.timings[stage] >= 0 and res.memory[stage]["host_peak_bytes"] > 0
    (out,) = res.files
    with av.open(str(out)) as c:
        kinds = sorted(s.type for s in c.streams)
        audio = c.streams.audio[0]
        assert kinds == ["audio", "video"]
        assert audio.codec_context.name == "aac" and audio.rate == 48000 and audio.channels == 2
        assert float(c.duration / av.time_base) == pytest.approx(4.0, abs=0.15)


def test_same_seed_same_audio_other_seed_differs(demo_engine, demo_result):
    again = demo_engine.generate(GenerationRequest(video=sample_clip_path(), prompt="a ball bouncing", steps=3, seed=11))
    other = demo_engine.generate(GenerationRequest(video=sample_clip_path(), prompt="a ball bouncing", steps=3, seed=12))
    assert torch.equal(again.waveform, demo_result.waveform)
    assert not torch.equal(other.waveform, demo_result.waveform)
    assert again.files == []


def test_bytes_input_equals_path_input(demo_engine, demo_result):
    data = sample_clip_path().read_bytes()
    res = demo_engine.generate(GenerationRequest(video=data, prompt="a ball bouncing", steps=3, seed=11))
    assert torch.equal(res.waveform, demo_result.waveform)


def test_prompt_changes_the_audio(demo_engine, demo_result):
    res = demo_engine.generate(GenerationRequest(video=sample_clip_path(), prompt="glass breaking", steps=3, seed=11))
    assert not torch.equal(res.waveform, demo_result.waveform)


@pytest.mark.slow
def test_duration_15_keeps_the_official_15_04_s_cut_with_a_warning(demo_engine, fixtures_dir):
    # The old default for a long video, now asked for: one clip, cut by the official decoder's rule.
    res = demo_engine.generate(GenerationRequest(video=fixtures_dir / "video_30fps_480f_16s.mp4", steps=1, duration=15))
    assert res.audio_seconds == pytest.approx(15.04)
    assert res.video_seconds == pytest.approx(16.0, abs=0.1)
    assert any("at most 15.04 s" in w and "silent" in w for w in res.warnings)


def test_batch_entry_point_isolates_failures(demo_engine, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    good = GenerationRequest(video=sample_clip_path(), steps=1, seed=1)
    results = demo_engine.generate_batch([good, GenerationRequest(video=bad, steps=1), GenerationRequest(video=sample_clip_path(), steps=0)])
    assert results[0].waveform.shape[-1] == 198 * 960
    assert isinstance(results[1], ValueError) and "bad.mp4" in str(results[1])
    assert isinstance(results[2], RequestError) and "steps" in str(results[2])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(video=""), "no video"),
        (dict(video=b""), "non-empty"),
        (dict(video="x.mp4", steps=0), "steps"),
        (dict(video="x.mp4", guidance=-1.0), "guidance"),
        (dict(video="x.mp4", seed=-5), "seed"),
        (dict(video="x.mp4", output="out.ogg"), "unknown format"),
        (dict(video="x.mp4", output="out.wav", keep_original_audio_gain=0.5), "mp4 output only"),
    ],
)
def test_request_validation(kwargs, match):
    with pytest.raises(RequestError, match=match):
        GenerationRequest(**kwargs).validate()


def test_device_and_precision_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(RequestError, match="unknown device"):
        resolve_device("warp-drive")
    with pytest.raises(RequestError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RequestError, match="no usable CUDA"):
            resolve_device("cuda")
    assert resolve_precision("bf16") == torch.bfloat16
    with pytest.raises(RequestError, match="unknown precision"):
        resolve_precision("fp4")


def _load(path, builder):
    return load_fixture_model(path, builder)


def test_engine_with_fixture_weights_matches_official_sampling(fixtures_dir, demo_engine):
    """The fixture's tiny DiT and DAC plugged into an Engine reproduce the official run."""
    run = load_file(str(fixtures_dir / "sampling_2s_cfg4.5_4steps.safetensors"))
    demo = demo_engine.components
    comps = Components(
        dit=_load(fixtures_dir / "tiny_foley_weights.safetensors", build_dit),
        dac=_load(fixtures_dir / "tiny_dac_weights.safetensors", build_dac),
        synchformer=demo.synchformer,
        siglip=demo.siglip,
        clap=demo.clap,
        tokenizer=demo.tokenizer,
        name="fixture",
        device=torch.device("cpu"),
    )
    engine = Engine(components=comps, precision="fp32")
    # The fixture's noise is torch.manual_seed(1234) + randn: our seeded generator gives the same.
    assert torch.equal(initial_noise(1, 100, seed=1234), run["initial_noise"])
    visual = VisualFeatures(siglip=run["siglip2_feat"], sync=run["syncformer_feat"], frames_25fps=50)
    text = TextFeatures(text=run["text_feat"], uncond=run["uncond_text_feat"])
    assert visual.latent_length == 100
    latents = engine.sample(visual, text, seeds=[1234], steps=4, guidance=4.5)
    assert max_abs(latents, run["final_latents"]) <= 1e-4
    assert rel_l2(latents, run["final_latents"]) <= 1e-5
    audio = engine.decode_audio(latents)
    assert rel_l2(audio, run["audio"]) <= 1e-5


def test_top_level_api_is_lazy():
    import subprocess
    import sys

    code = "import sys, foleyserve; assert 'torch' not in sys.modules; from foleyserve import Engine, GenerationRequest; print(Engine.__name__)"
    env = {"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Engine"
