"""Engine cost options end to end: offload modes, compile, step cache, and batched denoising."""

import pytest
import torch

from foleyserve import Engine, GenerationRequest
from foleyserve.config import ConfigError, EngineConfig
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.offload import HostCopy, SequentialBlocks


def _req(**kw):
    base = dict(video=str(sample_clip_path()), prompt="a ball bouncing", steps=3, seed=1)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.fixture(scope="module")
def reference():
    # Configured like the engines compared with it (the precision policy puts the DiT in its
    # inference layout), with every model resident.
    return Engine.from_config(EngineConfig(demo=True, precision="fp32", offload="none")).generate(_req()).waveform


@pytest.mark.parametrize("offload", ["stage", "sequential"])
def test_offload_modes_give_identical_audio(reference, offload):
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", offload=offload))
    assert engine.offload == offload
    assert torch.equal(engine.generate(_req()).waveform, reference)


def test_sequential_offload_streams_every_block_in_order():
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", offload="sequential"))
    streamer: SequentialBlocks = engine.components.dit._foleyserve_stream
    loads = []
    for i, copy in enumerate(streamer.copies):
        original = copy.load
        copy.load = lambda stream=None, i=i, original=original: (loads.append(i), original(stream))[1]
    engine.generate(_req(steps=1))
    n = len(streamer.copies)
    # each block is loaded before it runs (its own pre-hook or its predecessor's prefetch), in order
    firsts = sorted(set(loads), key=loads.index)
    assert firsts == list(range(n))
    assert not any(c.on_device for c in streamer.copies)  # all released after the step
    streamer.remove()


def test_host_copy_release_points_back_at_host_tensors():
    lin = torch.nn.Linear(4, 4)
    copy = HostCopy.of(lin, torch.device("cpu"))
    copy.load()
    assert copy.on_device
    copy.release()
    assert lin.weight.data.data_ptr() == copy.host[0].data_ptr()


def test_compile_with_sequential_offload_is_refused():
    with pytest.raises(ConfigError, match="sequential"):
        Engine.from_config(EngineConfig(demo=True, compile=True, offload="sequential"))


def test_bad_options_name_the_choices():
    with pytest.raises(ConfigError, match="none, stage, sequential"):
        EngineConfig(demo=True, offload="disk").validate()
    with pytest.raises(ConfigError, match="fp8-weight-only"):
        EngineConfig(demo=True, precision="int8").validate()
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineConfig.from_dict({"precison": "bf16"})


def test_encoder_precision_runs_the_encoders_under_autocast(reference):
    from foleyserve import media

    fp32 = Engine.from_config(EngineConfig(demo=True, precision="fp32", encoder_precision="fp32"))
    bf16 = Engine.from_config(EngineConfig(demo=True, precision="fp32", encoder_precision="bf16"))
    # fp32 encoders are the CPU's "auto": the same audio as the default engine.
    assert torch.equal(fp32.generate(_req()).waveform, reference)
    decoded = media.decode_frames(str(sample_clip_path()), fps_list=(8, 25), max_seconds=2.0)
    want, got = fp32.encode_visual(decoded), bf16.encode_visual(decoded)
    for a, b in ((want.siglip, got.siglip), (want.sync, got.sync)):
        assert a.dtype == b.dtype == torch.float32
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.05  # bf16 arithmetic happened, and stayed close
    text_a, text_b = fp32.extract_text("a ball bouncing", "noisy"), bf16.extract_text("a ball bouncing", "noisy")
    assert not torch.equal(text_a.text, text_b.text)
    assert float((text_a.text - text_b.text).norm() / text_a.text.norm()) < 0.05
    # Other features are other results: the engine's name (which keys every cache) says so.
    assert bf16.components.name != fp32.components.name and "encoders bf16" in bf16.components.name
    with pytest.raises(ConfigError, match="unknown encoder precision 'int8': choose one of auto, fp32, bf16, fp16"):
        EngineConfig(demo=True, encoder_precision="int8").validate()
    # Exported encoders run their graphs' precision: the setting would be silently ignored there.
    exported = dict(demo=True, precision="fp32", backend="onnxruntime", export_dir="x", encoder_precision="bf16")
    with pytest.raises(ConfigError, match="does not reach exported encoders \\(siglip, synchformer, clap\\)"):
        EngineConfig(**exported).validate()
    with pytest.raises(ConfigError, match="exported encoders \\(clap\\)"):
        EngineConfig(**exported, backend_stages=["clap", "dit"]).validate()
    EngineConfig(**exported, backend_stages=["dit", "dac"]).validate()  # encoders in torch: fine


def test_step_cache_zero_is_exact_and_reports(reference):
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", step_cache=0.0))
    assert torch.equal(engine.generate(_req()).waveform, reference)
    assert engine.last_step_cache_report["rows_skipped"] == 0


def test_precision_policy_through_the_engine(reference):
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp8"))
    out = engine.generate(_req()).waveform
    assert engine.policy_report["fp8_layers"] > 0
    assert not torch.equal(out, reference)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_compiled_blocks_match_eager(reference):
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", compile=True))
    assert engine.compiled
    out = engine.generate(_req()).waveform
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)


# -- batching ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return Engine.demo()


def test_batched_jobs_equal_solo_runs(engine):
    # different seeds, guidance and prompt lengths (the text is padded and masked in the batch)
    reqs = [
        _req(seed=3, guidance=4.5, prompt="a ball"),
        _req(seed=4, guidance=2.0, prompt="a heavy rubber ball bouncing on a wooden floor in a big hall"),
    ]
    jobs = [engine.prepare(r) for r in reqs]
    assert jobs[0].text.text.shape[1] != jobs[1].text.text.shape[1]
    batched = engine.sample_jobs(jobs)
    for job, lat in zip(jobs, batched):
        solo = engine.sample_jobs([engine.prepare(job.request)])[0]
        torch.testing.assert_close(lat, solo, rtol=1e-4, atol=1e-5)


def test_a_row_leaving_the_batch_leaves_the_others_unchanged(engine):
    jobs = [engine.prepare(_req(seed=s)) for s in (5, 6, 7)]
    calls = {"n": 0}

    def keep():
        calls["n"] += 1
        return [True, calls["n"] < 2, True]  # row 1 cancelled after the first step

    out = engine.sample_jobs(jobs, keep_rows=keep)
    for i in (0, 2):
        solo = engine.sample_jobs([jobs[i]])[0]
        torch.testing.assert_close(out[i], solo, rtol=1e-4, atol=1e-5)


def test_jobs_of_different_keys_are_refused(engine):
    a, b = engine.prepare(_req(steps=2)), engine.prepare(_req(steps=3))
    with pytest.raises(ValueError, match="batch keys"):
        engine.sample_jobs([a, b])


def test_generate_batch_isolates_a_bad_request(engine, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    results = engine.generate_batch([_req(seed=1), _req(video=str(bad)), _req(seed=2)], max_batch_size=4)
    assert isinstance(results[1], Exception) and "video" in str(results[1]).lower()
    assert results[0].waveform.shape == results[2].waveform.shape
    assert not torch.equal(results[0].waveform, results[2].waveform)


def test_non_finite_latents_fail_loudly(monkeypatch):
    engine = Engine.demo()
    engine.precision = "fp16"
    job = engine.prepare(_req(steps=1))
    dit = engine.components.dit
    monkeypatch.setattr(dit, "predict_flow", lambda x, t, c, cache=None: torch.full_like(x, float("inf")))
    with pytest.raises(RuntimeError, match="non-finite.*use bf16"):
        engine.sample_jobs([job])
