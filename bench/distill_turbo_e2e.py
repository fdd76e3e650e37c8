"""End-to-end time of the turbo tier vs the default on the bundled sample clip (demo model, CPU).

Runs ``Engine.generate`` on the sample clip with (a) the default demo engine (fp32, the given steps
with CFG), (b) the same engine with ``--student`` and ``--light-decoder`` (its recorded steps,
no CFG, light decoder) and (c) (b) with the encoders under bf16 autocast, as the turbo profile
ships. One warm-up each, then ``--repeats`` rounds, each running the engines back to back; medians
per stage. (c)'s audio is compared with (b)'s (same seed): what bf16 encoders cost in fidelity.

    python bench/distill_turbo_e2e.py --student RUN/student-k4.safetensors \
        --light-decoder RUN/light-decoder.safetensors --json bench/results/distill_turbo_e2e_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from foleyserve.config import DEMO_STEPS, EngineConfig
from foleyserve.pipeline.demo import DEMO_PROMPT, sample_clip_path
from foleyserve.pipeline.pipeline import Engine
from foleyserve.pipeline.requests import GenerationRequest


def _request(steps: int) -> GenerationRequest:
    return GenerationRequest(video=sample_clip_path(), prompt=DEMO_PROMPT, steps=steps, guidance=4.5, loudness=None, seed=0)


def _timed(engine: Engine, steps: int, record: dict) -> torch.Tensor:
    start = time.perf_counter()
    result = engine.generate(_request(steps))
    record.setdefault("runs_s", []).append(time.perf_counter() - start)
    for k, v in result.timings.items():
        record.setdefault("stages", {}).setdefault(k, []).append(v)
    return result.waveform


def _summary(record: dict) -> dict:
    return {"median_s": statistics.median(record["runs_s"]), "runs_s": record["runs_s"],
            "stages_median_s": {k: statistics.median(v) for k, v in record["stages"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--light-decoder", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"the default engine's steps (default {DEMO_STEPS}, the demo's)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = EngineConfig(demo=True, precision=args.precision, device="cpu")
    turbo_cfg = EngineConfig(**{**base.__dict__, "student": args.student, "light_decoder": args.light_decoder})
    engines = {
        "default": Engine.from_config(base),
        "turbo": Engine.from_config(turbo_cfg),
        "turbo_bf16_encoders": Engine.from_config(EngineConfig(**{**turbo_cfg.__dict__, "encoder_precision": "bf16"})),
    }
    for engine in engines.values():
        engine.generate(_request(args.steps))  # warm-up
    records: dict[str, dict] = {name: {} for name in engines}
    waves: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            waves[name] = _timed(engine, args.steps, records[name])
    summary = {name: _summary(r) for name, r in records.items()}
    for name, r in summary.items():
        print(f"{name}: {r['median_s']:.3f} s  {r['stages_median_s']}", flush=True)
    from foleyserve.fidelity_measures import log_mel_distance, rel_l2, snr_db

    ref, got = waves["turbo"].flatten().float(), waves["turbo_bf16_encoders"].flatten().float()
    fidelity = {"waveform_rel_l2": rel_l2(got, ref), "snr_db": snr_db(got, ref),
                "log_mel_db": log_mel_distance(got, ref, int(engines["turbo"].components.dac.sample_rate))}
    print(f"bf16 encoders vs fp32 encoders (turbo, same seed): {fidelity}")
    result = {
        "what": "Engine.generate on the bundled sample clip, demo model, CPU", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "precision": args.precision, "default_steps": args.steps, **summary,
        "speedup": summary["default"]["median_s"] / summary["turbo"]["median_s"],
        "speedup_bf16_encoders": summary["default"]["median_s"] / summary["turbo_bf16_encoders"]["median_s"],
        "bf16_encoders_vs_fp32": fidelity,
    }
    print(f"speedup {result['speedup']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
