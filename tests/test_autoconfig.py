"""Settings for the machine (`--auto`): decisions on faked machines, and the CLI/serve wiring."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from foleyserve import autoconfig
from foleyserve.autoconfig import GIB, MachineFacts, choose, device_peak
from foleyserve.cli import build_parser, main

H200 = MachineFacts("NVIDIA H200", 141 * GIB, 139 * GIB, (9, 0), frozenset(), 256 * GIB, 240 * GIB)
RTX_3090 = MachineFacts("NVIDIA GeForce RTX 3090", 24 * GIB, int(23.3 * GIB), (8, 6), frozenset(), 64 * GIB, 60 * GIB)
GPU_8GB = MachineFacts("NVIDIA GeForce RTX 3070", 8 * GIB, int(7.6 * GIB), (8, 6), frozenset(), 32 * GIB, 28 * GIB)
CPU_BF16 = MachineFacts(cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}), host_total_bytes=24 * GIB, host_available_bytes=21 * GIB)
CPU_PLAIN = MachineFacts(cpu_flags=frozenset({"avx2", "fma"}), host_total_bytes=64 * GIB, host_available_bytes=60 * GIB)


def test_h200_runs_xxl_bf16_resident_with_a_full_batch() -> None:
    d = choose(H200)
    assert (d.device, d.model, d.precision, d.offload, d.step_cache) == ("cuda", "xxl", "bf16", "none", None)
    assert d.batch_size == autoconfig.MAX_AUTO_BATCH
    assert any("--precision fp8" in r for r in d.reasons)  # sm_90 has FP8 tensor cores: the trade is offered


def test_24gb_ampere_keeps_xxl_bf16_and_never_picks_fp8_gemms() -> None:
    d = choose(RTX_3090)
    assert (d.model, d.precision, d.offload) == ("xxl", "bf16", "none")
    assert d.estimated_peak_bytes <= RTX_3090.gpu_free_bytes - autoconfig.DEVICE_HEADROOM
    assert not any("--precision fp8" in r for r in d.reasons)  # sm_86: no FP8 tensor cores


def test_8gb_gpu_drops_to_fp8_weights_with_stage_offload_and_says_why() -> None:
    d = choose(GPU_8GB)
    assert d.device == "cuda" and d.precision == "fp8-weight-only" and d.offload in ("stage", "sequential")
    assert d.estimated_peak_bytes <= GPU_8GB.gpu_free_bytes - autoconfig.DEVICE_HEADROOM
    text = d.describe()
    assert "does not fit" in text and "bf16" in text and "sm_89" in text


def test_sm89_small_gpu_uses_real_fp8() -> None:
    ada_8gb = MachineFacts("RTX 4060", 8 * GIB, int(7.6 * GIB), (8, 9), frozenset(), 32 * GIB, 28 * GIB)
    assert choose(ada_8gb).precision == "fp8"


def test_tiny_gpu_falls_back_to_the_cpu() -> None:
    tiny = MachineFacts("old", 2 * GIB, int(1.5 * GIB), (8, 6), frozenset({"avx512_bf16"}), 32 * GIB, 28 * GIB)
    d = choose(tiny)
    assert d.device == "cpu" and any("fits no configuration" in r for r in d.reasons)


def test_cpu_with_avx512_bf16_runs_xl_bf16_with_the_step_cache() -> None:
    d = choose(CPU_BF16)
    assert (d.device, d.model, d.precision, d.offload, d.batch_size) == ("cpu", "xl", "bf16", "none", 1)
    assert d.step_cache == autoconfig.SLOW_STEP_CACHE
    assert any("avx512_bf16" in r for r in d.reasons)


def test_cpu_without_bf16_units_runs_fp32_unless_memory_forbids() -> None:
    assert choose(CPU_PLAIN).precision == "fp32"
    small = MachineFacts(cpu_flags=frozenset({"avx2"}), host_total_bytes=16 * GIB, host_available_bytes=13 * GIB)
    d = choose(small)
    assert d.precision == "bf16" and any("for memory" in r for r in d.reasons)


def test_only_the_models_the_folder_has_are_chosen() -> None:
    assert choose(H200, models=("xl",)).model == "xl"
    assert choose(CPU_BF16, models=("xxl",)).model == "xxl"


def test_shorter_clips_fit_larger_batches() -> None:
    assert choose(GPU_8GB, clip_seconds=2).batch_size >= choose(GPU_8GB, clip_seconds=15).batch_size
    assert device_peak("xxl", "bf16", "none", 15, 8) > device_peak("xxl", "bf16", "none", 15, 1)


def test_explicit_values_survive_apply() -> None:
    from foleyserve.config import EngineConfig

    cfg = choose(H200).apply(EngineConfig(demo=True, precision="fp8"), keep={"precision"})
    assert cfg.precision == "fp8" and cfg.model == "xxl" and cfg.device == "cuda"


def test_gather_facts_reads_this_machine() -> None:
    facts = autoconfig.gather_facts("cpu")
    assert facts.host_total_bytes > 0 and facts.gpu_name is None


# ------------------------------------------------------------------------------------ wiring


@pytest.fixture
def fake_h200(monkeypatch):
    monkeypatch.setattr(autoconfig, "gather_facts", lambda device="auto": H200)


def test_serve_auto_sets_engine_and_batch_and_flags_win(fake_h200, tmp_path: Path, capsys) -> None:
    from foleyserve.commands.serve import configs_from_args

    (tmp_path / "m").mkdir()
    args = build_parser().parse_args(["serve", "--auto", "--model-dir", str(tmp_path / "m"), "--offload", "stage"])
    engine, server = configs_from_args(args, environ={})
    assert (engine.model, engine.precision, engine.device) == ("xxl", "bf16", "cuda")
    assert engine.offload == "stage"  # the flag wins
    assert server.max_batch_size == autoconfig.MAX_AUTO_BATCH
    err = capsys.readouterr().err
    assert "auto: model xxl, precision bf16" in err and "  - GPU NVIDIA H200" in err


def test_serve_profile_auto_is_the_same(fake_h200, tmp_path: Path, capsys) -> None:
    from foleyserve.commands.serve import configs_from_args

    (tmp_path / "m").mkdir()
    args = build_parser().parse_args(["serve", "--profile", "auto", "--model-dir", str(tmp_path / "m"), "--max-batch-size", "2"])
    engine, server = configs_from_args(args, environ={})
    assert engine.precision == "bf16" and server.max_batch_size == 2


def test_auto_profile_is_shipped_in_both_places() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "profiles" / "auto.yaml").read_bytes() == (repo / "src" / "foleyserve" / "profiles" / "auto.yaml").read_bytes()


def test_generate_auto_prints_the_decision_and_keeps_explicit_flags(fake_h200, capsys) -> None:
    from foleyserve.commands.generate_options import resolve_generate_args

    args = build_parser().parse_args(["generate", "x.mp4", "--auto", "--model-dir", "m", "--precision", "fp8", "--duration", "4"])
    resolve_generate_args(args)
    assert (args.precision, args.model, args.offload, args.device) == ("fp8", "xxl", "none", "cuda")
    err = capsys.readouterr().err
    assert "auto: model xxl" in err and "kept as given: --precision" in err


def test_generate_without_auto_gets_the_plain_defaults() -> None:
    from foleyserve.commands.generate_options import resolve_generate_args

    args = build_parser().parse_args(["generate", "x.mp4", "--demo"])
    resolve_generate_args(args)
    assert (args.model, args.offload) == ("xxl", "none")


def test_generate_auto_with_the_demo_runs(tmp_path: Path, capsys) -> None:
    from foleyserve.pipeline.demo import sample_clip_path

    out = tmp_path / "a.wav"
    assert main(["generate", str(sample_clip_path()), "--demo", "--auto", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "auto: model" in err and "demo model keeps its own settings" in err and out.is_file()
