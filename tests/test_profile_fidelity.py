"""`foleyserve profile` / `foleyserve fidelity`, the random real-size components and the DiT FLOP counter.

Everything runs on the demo model with 2 steps (or on the meta device for the real sizes), so the
module stays fast on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from foleyserve.cli import main
from foleyserve.commands import fidelity
from foleyserve.commands.profile import STAGE_LABELS, STAGES
from foleyserve.models.dit import build_dit, tiny_config, xl_config, xxl_config
from foleyserve.pipeline.random_models import (
    OFFICIAL_DAC_KWARGS,
    pool_fill_,
    random_components,
    random_dit,
    _dit_scale,
)

REPO = Path(__file__).resolve().parents[1]
FAST = ["--demo", "--steps", "2", "--seconds", "1"]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dit_step():
    return _bench("dit_step")


# ----------------------------------------------------------------------------------- profile


@pytest.mark.slow
def test_profile_prints_every_stage_and_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = main(["profile", *FAST, "--repeat", "2", "--warmup", "0", "--output", "wav", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for stage in STAGES:
        assert f"| {STAGE_LABELS[stage]} |" in printed
    assert "| dit per step (steps 2-2) |" in printed and "**total**" in printed
    data = json.loads(out.read_text())
    assert set(data["summary"]) >= set(STAGES) | {"dit_per_step", "total"}
    assert len(data["runs"]) == 2
    assert data["settings"]["steps"] == 2 and data["settings"]["precision"] == "fp32"
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu_cores"] >= 1
    clip = data["clip"]
    assert clip["audio_seconds"] <= 1.1 and clip["latent_length"] == int(clip["audio_seconds"] * 50)
    assert clip["sync_tokens"] % 8 == 0 and clip["text_tokens"] > 0
    assert "--seconds 1" in printed  # the cut is reported, not mistaken for a too-long video
    for stage in STAGES:
        s = data["summary"][stage]
        assert 0 <= s["min_s"] <= s["median_s"] <= s["max_s"]
        assert s["host_peak_bytes"] > 0 and s["device_peak_bytes"] is None  # CPU: no device memory
    # Every run's stage times add up to (at most) its wall total.
    for run in data["runs"]:
        assert sum(r["seconds"] for r in run["stages"].values()) <= run["total_s"] + 1e-6


def test_profile_applies_the_precision_and_step_cache_it_reports(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", *FAST, "--repeat", "1", "--warmup", "0", "--output", "none",
                 "--precision", "bf16", "--step-cache", "0.05", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["precision"] == "bf16" and data["settings"]["step_cache"] == 0.05
    assert data["runs"][0]["step_cache"]["model_calls"] == 2
    assert "write" not in data["summary"]  # --output none writes nothing
    assert "step cache (last run)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "--demo", "--video", "/nonexistent/clip.mp4"], "does not exist"),
        (["profile", "--demo", "--json", "/nonexistent-dir/x.json"], "does not exist"),
        (["profile", "--demo", "--steps", "0"], "must be at least 1"),
        (["profile", "--demo", "--precision", "fp64"], "invalid choice"),
        (["profile", "--demo", "--seconds", "0.1"], "at least 0.64"),
        (["profile", "--model-dir", "/nonexistent/models"], "does not exist"),
        (["fidelity", "--demo", "--precisions", "fp32,fp64"], "unknown precision 'fp64'"),
        (["fidelity", "--demo", "--step-cache", "0,-1"], ">= 0"),
        (["fidelity", "--demo", "--step-cache", ","], "empty"),
        (["fidelity", "--demo", "--device", "cuda:7"] if not torch.cuda.is_available() else ["fidelity", "--device", "tpu"], "cuda"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------- fidelity


@pytest.mark.slow
def test_fidelity_fp32_matches_itself_and_bf16_does_not(tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    assert main(["fidelity", *FAST, "--precisions", "fp32,bf16", "--step-cache", "0,0.05", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| precision | step cache | latents rel_l2" in printed
    rows = {(r["precision"], r["step_cache"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("fp32", 0.0), ("fp32", 0.05), ("bf16", 0.0), ("bf16", 0.05)}
    exact = rows[("fp32", 0.0)]
    assert exact["latents_rel_l2"] == 0.0 and exact["audio_rel_l2"] == 0.0 and exact["log_mel_db"] == 0.0
    assert exact["latents_snr_db"] is None  # infinite SNR: JSON has no inf
    bf16 = rows[("bf16", 0.0)]
    assert 0 < bf16["latents_rel_l2"] < 0.2 and bf16["audio_rel_l2"] > 0 and bf16["log_mel_db"] > 0
    assert bf16["latents_snr_db"] == pytest.approx(-20 * math.log10(bf16["latents_rel_l2"]))
    for r in rows.values():
        assert 0.0 <= r["saved_fraction"] <= 1.0 and r["sampling_s"] > 0


def test_fidelity_reports_an_unavailable_setting_and_runs_the_rest(monkeypatch, capsys):
    real = fidelity.apply_precision

    def fake(dit, precision):
        if precision == "fp8":
            raise fidelity.Unavailable("no fp8 kernels on this test machine")
        return real(dit, precision)

    monkeypatch.setattr(fidelity, "apply_precision", fake)
    assert main(["fidelity", *FAST, "--precisions", "fp8,fp32", "--step-cache", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| fp8 | 0 | unavailable: no fp8 kernels on this test machine |" in printed
    assert "| fp32 | 0 | 0.000e+00 | inf |" in printed


@pytest.mark.slow
def test_overflowing_precision_is_reported_not_written(monkeypatch, capsys):
    from foleyserve.pipeline.pipeline import Engine

    real_sample_jobs = Engine.sample_jobs

    def overflowing(self, jobs, **kw):
        return [torch.full_like(x, float("nan")) for x in real_sample_jobs(self, jobs, **kw)]

    monkeypatch.setattr(Engine, "sample_jobs", overflowing)
    assert main(["profile", *FAST, "--repeat", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert "non-finite latents" in err and "Traceback" not in err

    real_sample = fidelity.sample

    def nan_for_bf16(subject, dit, **kw):
        latents, wave, report, seconds = real_sample(subject, dit, **kw)
        if dit.dtype == torch.bfloat16:
            latents = torch.full_like(latents, float("nan"))
        return latents, wave, report, seconds

    monkeypatch.setattr(fidelity, "sample", nan_for_bf16)
    assert main(["fidelity", *FAST, "--precisions", "fp32,bf16", "--step-cache", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| bf16 | 0 | unavailable: non-finite output" in printed and "| fp32 | 0 | 0.000e+00 |" in printed


def test_fidelity_step_cache_saves_work_on_a_longer_schedule():
    from foleyserve.pipeline.demo import sample_clip_path

    subject = fidelity.demo_subject(video=sample_clip_path(), seconds=1.0, seed=0, prompt="rain",
                                    negative="noisy, harsh", device=torch.device("cpu"))
    rows, _ = fidelity.compare(subject, precisions=["fp32"], caches=[0.0, 0.5], steps=12, guidance=4.5)
    off, cached = rows
    assert off.saved_fraction == 0.0 and off.latents_rel_l2 == 0.0
    assert cached.saved_fraction > 0 and cached.latents_rel_l2 > 0


@pytest.mark.slow
def test_fidelity_fixture_reference_matches_the_official_run(capsys):
    assert main(["fidelity", "--fixture", "--precisions", "fp32", "--step-cache", "0"]) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("sanity:"))
    latents_err = float(line.split("latents rel_l2 ")[1].split(",")[0])
    assert latents_err < 1e-5


# ----------------------------------------------------------------------------------- random weights


def test_tiny_random_components_are_the_demo_model():
    from foleyserve.pipeline.demo import demo_components

    comps = random_components("tiny", seed=3)
    demo = demo_components(torch.device("cpu"), seed=3)
    for (name, a), (_, b) in zip(comps.dit.state_dict().items(), demo.dit.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(random_dit("tiny", seed=3).audio_embedder.proj.weight, demo.dit.audio_embedder.proj.weight)


@pytest.mark.parametrize("size", ["xl", "xxl"])
def test_real_size_dit_has_the_official_parameter_count(size, reference_dir):
    dit = random_dit(size, device="meta")
    manifest = json.loads((reference_dir / f"manifest-{size}.json").read_text())
    assert sum(p.numel() for p in dit.parameters()) == manifest["total_params"]
    assert len(dit.state_dict()) == manifest["num_tensors"]


def test_real_size_dac_and_synchformer_match_the_official_files(reference_dir):
    from foleyserve.models.synchformer import build_synchformer_visual
    from foleyserve.models.vae import build_dac

    with torch.device("meta"):
        dac = build_dac(OFFICIAL_DAC_KWARGS)
        sync = build_synchformer_visual()
    dac_manifest = json.loads((reference_dir / "manifest-dac-vae.json").read_text())
    assert sum(p.numel() for p in dac.parameters()) == dac_manifest["total_params"]
    assert dac.hop_length == 960 and dac.sample_rate == 48000
    sync_manifest = json.loads((reference_dir / "manifest-synchformer.json").read_text())
    visual = sync_manifest["params_by_branch"]
    expected = next(v for k, v in visual.items() if "vfeat" in k or "visual" in k)
    assert sum(p.numel() for p in sync.parameters()) == expected


def test_pool_fill_is_seeded_and_has_the_layer_scale():
    def make():
        return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024))

    a, b, c = make(), make(), make()
    for m, seed in ((a, 1), (b, 1), (c, 2)):
        pool_fill_(m, lambda n, p: _dit_scale(n.replace("1.weight", "norm.weight"), p), seed)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert a[0].weight.std().item() == pytest.approx(512**-0.5, rel=0.02)
    assert a[0].bias.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(a[1].weight == 1.0)


# ----------------------------------------------------------------------------------- FLOP counter


def test_flop_counter_matches_the_research_notes(dit_step):
    ten = dit_step.clip_lengths(10.0)
    assert ten == {"audio_len": 500, "visual_len": 80, "sync_len": 240}
    assert dit_step.clip_lengths(8.0) == {"audio_len": 400, "visual_len": 64, "sync_len": 192}
    xxl = dit_step.dit_flops(xxl_config(), **ten, text_len=20, batch=2)
    # ~386 TFLOP for a 10 s XXL clip at 50 steps with CFG (batch 2), official-pipeline.md section 14.
    assert 50 * xxl["total"] / 1e12 == pytest.approx(386, rel=0.005)
    assert xxl["conv_k3"] / xxl["total"] == pytest.approx(0.59, abs=0.01)
    assert xxl["attention"] / xxl["total"] == pytest.approx(0.024, abs=0.002)
    xl8 = dit_step.dit_flops(xl_config(), **dit_step.clip_lengths(8.0), text_len=20, batch=2)
    assert xl8["total"] / 1e12 == pytest.approx(3.50, rel=0.005)
    ours = dit_step.dit_flops(xxl_config(), **ten, text_len=20, batch=2, mode="ours")
    assert ours["total"] < xxl["total"]
    with pytest.raises(ValueError):
        dit_step.dit_flops(xxl_config(), **ten, text_len=20, mode="flux")


def test_flop_counter_matches_torch_flop_counter_on_our_step(dit_step):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_config()
    dit = build_dit(cfg, seed=0)
    lengths = dit_step.clip_lengths(8.0)
    inputs = dit_step.make_inputs(cfg, lengths, 20, torch.device("cpu"))
    with torch.inference_mode():
        cond = dit.prepare_conditions(clip_feat=inputs["clip_feat"], sync_feat=inputs["sync_feat"], cond=inputs["cond"],
                                      audio_len=lengths["audio_len"])
        counter = FlopCounterMode(display=False)
        with counter:
            dit.predict_flow(inputs["x"], inputs["t"], cond)
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for k, v in counts.items() if "scaled_dot_product" in str(k))
    others = sum(v for k, v in counts.items() if "scaled_dot_product" not in str(k))
    ours = dit_step.dit_flops(cfg, **lengths, text_len=20, batch=2, mode="ours")
    # torch's counter skips CPU attention kernels; everything else must agree exactly.
    assert others == ours["total"] - ours["attention"]
    if attention:
        assert attention == pytest.approx(ours["attention"], rel=1e-6)


# ----------------------------------------------------------------------------------- bench scripts


@pytest.mark.slow
def test_bench_scripts_run_on_the_tiny_model(tmp_path, dit_step, capsys):
    out = tmp_path / "dit.json"
    assert dit_step.main(["--sizes", "tiny", "--seconds", "2", "--precisions", "fp32,bf16", "--repeats", "1",
                          "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"] and all(r["ours_s"] > 0 for r in rows)
    assert "| tiny | 2 | 100 / 16 / 40 / 20 | fp32 |" in capsys.readouterr().out

    # bench/gpu.py became bench/device_check.py: tests/test_device_check.py runs it.

    policies = _bench("policies")
    out = tmp_path / "policies.json"
    assert policies.main(["--sizes", "tiny", "--precisions", "fp32,bf16", "--steps", "2", "--seconds", "1",
                          "--repeat", "1", "--warmup", "0", "--json", str(out)]) == 0
    block = json.loads(out.read_text())["sizes"][0]
    assert set(block["policies"]) == {"fp32", "bf16"} and block["settings"]["interleaved"]
    assert "| dit (total) |" in capsys.readouterr().out
