#!/usr/bin/env python3
"""Per-stage time of one generation under every precision policy, at the tiny and XL sizes.

Uses the ``foleyserve profile`` machinery (``foleyserve.commands.profile.run_once``): decode,
SigLIP2, Synchformer, CLAP, DiT (total and per step), DAC and write/mux, median wall seconds and
the process's peak RSS. The encoders, the DAC and the tokenizer are built once per size and shared;
each policy gets its own denoiser with the same seeded weights, built in the dtype it computes in
and then converted by ``Engine.configure`` (``foleyserve.precision.apply_policy``).

    python bench/policies.py                                   # tiny: whole sample clip, 25 steps
    python bench/policies.py --sizes xl --steps 2 --seconds 2 --repeat 1 --warmup 1
    python bench/policies.py --json bench/results/policies_cpu.json

At the tiny size every policy's engine is alive at once and the runs are interleaved (fp32, bf16,
..., fp32, bf16, ...) so that drift affects them alike. A real-size DiT per policy would not fit in
memory together with the others, so at xl/xxl the policies run one after the other (said in the
output). A policy this machine cannot run is reported as "unavailable: <reason>".
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

POLICIES = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
GIB = float(1 << 30)


def log(line: str) -> None:
    print(f"policies: {line}", file=sys.stderr, flush=True)


def make_engine(comps_template, size: str, precision: str, device: torch.device):
    """An engine sharing the template's encoders/DAC, with its own DiT under ``precision``."""
    import copy

    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.random_models import random_dit

    storage = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
    comps = copy.copy(comps_template)
    comps.dit = random_dit(size, device=device, dtype=storage, seed=0)
    engine = Engine(components=comps, precision="fp32" if precision == "fp32" else "bf16")
    # The weights are already built (random, like the demo's): the options travel under demo=True.
    return engine.configure(EngineConfig(demo=True, model="xl" if size == "tiny" else size, precision=precision, device=str(device)))


def bench_size(size: str, args: argparse.Namespace, device: torch.device, video: Path) -> dict[str, Any]:
    from foleyserve.commands.profile import ProfileResult, machine_info, run_once
    from foleyserve.pipeline.random_models import random_components
    from foleyserve.pipeline.requests import GenerationRequest

    steps = args.steps or (25 if size == "tiny" else 2)
    seconds = args.seconds or (15.0 if size == "tiny" else 2.0)
    repeat = args.repeat or (5 if size == "tiny" else 1)
    warmup = 1 if args.warmup is None else args.warmup
    interleave = size == "tiny"
    start = time.perf_counter()
    from foleyserve.pipeline.random_models import random_dit

    # Each policy brings its own DiT; a tiny placeholder saves building a real one for nothing.
    template = random_components(size, device=device, seed=0, log=log, dit=random_dit("tiny", device=device))
    log(f"{size}: shared encoders and DAC built in {time.perf_counter() - start:.1f} s")

    import tempfile

    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="foleyserve-policies-") as tmp:
        req = GenerationRequest(video=video, prompt="a ball bouncing on a wooden floor", steps=steps,
                                output=Path(tmp) / "out.mp4")

        def build(p: str):
            try:
                return make_engine(template, size, p, device)
            except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
                unavailable[p] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log(f"{size} {p}: unavailable: {unavailable[p]}")
                return None

        runs: dict[str, list] = {p: [] for p in args.precisions}
        clips: dict[str, dict] = {}
        reports: dict[str, Any] = {}

        def one(p: str, engine, counted: bool, label: str) -> None:
            try:
                record, clip = run_once(engine, req, max_seconds=seconds)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                # ValueError: MediaError, e.g. an encoder refusing what a run produced.
                unavailable[p] = f"failed: {str(e).strip().splitlines()[0]}"
                log(f"{size} {p}: {unavailable[p]}")
                return
            clips[p] = clip
            log(f"{size} {p} {label}: {record.total_seconds:.2f} s (dit {record.stages['dit']['seconds']:.2f} s)")
            if counted:
                runs[p].append(record)

        if interleave:
            engines = {p: build(p) for p in args.precisions}
            for p, e in engines.items():
                if e is not None:
                    reports[p] = e.policy_report
            for i in range(warmup + repeat):
                for p, engine in engines.items():
                    if engine is not None and p not in unavailable:
                        one(p, engine, i >= warmup, f"{'warm-up' if i < warmup else 'run'} {i + 1}")
            del engines
        else:
            for p in args.precisions:
                engine = build(p)
                if engine is None:
                    continue
                reports[p] = engine.policy_report
                for i in range(warmup + repeat):
                    if p not in unavailable:
                        one(p, engine, i >= warmup, f"{'warm-up' if i < warmup else 'run'} {i + 1}")
                del engine
                gc.collect()

    machine = machine_info()
    settings = {"steps": steps, "seconds": seconds, "repeat": repeat, "warmup": warmup, "interleaved": interleave}
    per_policy = {}
    for p in args.precisions:
        if p in unavailable or not runs[p]:
            continue
        clip = dict(clips[p])
        clip.pop("warnings", None)
        result = ProfileResult(machine=machine, settings=settings, clip=clip, runs=runs[p])
        per_policy[p] = {"summary": result.summary(), "clip": clip,
                         "runs": [{"stages": r.stages, "total_s": r.total_seconds, "step_s": r.step_seconds} for r in runs[p]],
                         "policy": reports.get(p)}
    del template
    gc.collect()
    return {"size": size, "settings": settings, "machine": machine, "policies": per_policy, "unavailable": unavailable}


def format_size(block: dict[str, Any], precisions: list[str]) -> str:
    from foleyserve.commands.profile import STAGE_LABELS, STAGES, describe_machine

    s = block["settings"]
    pol = block["policies"]
    clip = next(iter(pol.values()))["clip"] if pol else {}
    order = "interleaved runs" if s["interleaved"] else "policies run one after the other (one real-size DiT in memory at a time)"
    lines = [
        f"## {block['size']}: {clip.get('audio_seconds')} s of audio (latent {clip.get('latent_length')}), {s['steps']} steps, CFG 4.5",
        f"median of {s['repeat']} after {s['warmup']} warm-up, {order}; {describe_machine(block['machine'])}",
        "",
        "| stage (median s) | " + " | ".join(precisions) + " |",
        "|---|" + "---|" * len(precisions),
    ]

    def cell(p: str, pick) -> str:
        if p in block["unavailable"]:
            return f"unavailable: {block['unavailable'][p]}"
        if p not in pol:
            return "-"
        return pick(pol[p])

    stage_rows = [x for st in STAGES for x in ((st, "dit_per_step") if st == "dit" else (st,))] + ["total"]
    for stage in stage_rows:
        if not any(stage in v["summary"] for v in pol.values()):
            continue
        label = {"dit_per_step": f"dit per step (steps 2-{s['steps']})", "total": "**total** (wall)"}.get(stage, STAGE_LABELS.get(stage, stage))
        digits = 4 if stage == "dit_per_step" else 3
        lines.append(f"| {label} | " + " | ".join(cell(p, lambda v: f"{v['summary'][stage]['median_s']:.{digits}f}" if stage in v["summary"] else "-")
                                                 for p in precisions) + " |")
    lines.append("| host peak GiB (process) | " + " | ".join(
        cell(p, lambda v: f"{max(x['host_peak_bytes'] for k, x in v['summary'].items() if 'host_peak_bytes' in x) / GIB:.2f}") for p in precisions) + " |")
    lines.append("| DiT weights GiB | " + " | ".join(
        cell(p, lambda v: f"{v['policy']['weight_bytes_after'] / GIB:.3f}" if v.get("policy") else "-") for p in precisions) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,xl", help="comma-separated: tiny, xl, xxl (default tiny,xl)")
    ap.add_argument("--precisions", default=",".join(POLICIES), help="policies (default: all five)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 25 tiny, 2 at real sizes)")
    ap.add_argument("--seconds", type=float, help="seconds of the clip used (default 15 tiny, 2 at real sizes)")
    ap.add_argument("--repeat", type=int, help="counted runs (default 5 tiny, 1 at real sizes)")
    ap.add_argument("--warmup", type=int, help="uncounted runs first (default 1)")
    ap.add_argument("--video", type=Path, help="input video (default: the bundled 4 s sample clip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write every number as JSON")
    args = ap.parse_args(argv)
    import logging

    # Result warnings (demo weights, cut clip) would repeat on every run; the tables say it once.
    logging.getLogger("foleyserve").setLevel(logging.ERROR)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [p for p in args.precisions if p not in POLICIES] + [s for s in sizes if s not in ("tiny", "xl", "xxl")]
    if bad:
        ap.error(f"unknown policy or size: {', '.join(bad)}")
    from foleyserve.pipeline.demo import sample_clip_path

    video = args.video or sample_clip_path()
    if not video.is_file():
        ap.error(f"video {video} does not exist")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no usable CUDA GPU")
    blocks = [bench_size(size, args, device, video) for size in sizes]
    print(f"# Per-stage seconds by precision policy on {device} (`python bench/policies.py {' '.join(sys.argv[1:])}`)")
    for block in blocks:
        print()
        print(format_size(block, args.precisions))
    if args.json:
        args.json.write_text(json.dumps({"tool": "bench/policies.py", "argv": sys.argv[1:], "sizes": blocks}, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
