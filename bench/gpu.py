#!/usr/bin/env python3
"""The GPU suite: end-to-end and DiT seconds, peak VRAM and MFU, per model size, clip and cost option.

Runs unchanged on one H100 / H200:

    python bench/gpu.py --json bench/results/gpu_h100.json --md bench/results/gpu_h100.md

For each size (XXL and XL, seeded random weights at the real sizes, built directly in bf16 on the
GPU), each clip length (8 s and 10 s synthetic clips, made here with PyAV) and each configuration

* ``bf16-eager``     bf16 policy, no compile
* ``bf16-compiled``  bf16 policy + ``torch.compile`` (CUDA graphs where the engine uses them)
* ``fp8``            fp8 policy (e4m3 weights and activations, ``torch._scaled_mm`` on Ada/Hopper)
* ``fp8-cache``      fp8 + the step cache at ``--cache-threshold``

it runs the whole pipeline ``--repeat`` times after ``--warmup`` uncounted runs (the first run of
a compiled model compiles) and reports medians: end-to-end seconds (video file in, mp4 out), DiT
seconds (the whole denoising loop) and per step, peak GPU memory (``torch.cuda.max_memory_allocated``
over the run), and MFU = model FLOPs / DiT seconds / ``--peak-tflops`` (790 TFLOP/s: a bf16 8192^3
matmul measured on these machines). Model FLOPs are counted analytically from the config and the
clip's token counts by ``bench/dit_step.py:dit_flops`` (the official forward's work, 50 steps x a
CFG batch of 2: ~386 TFLOP for a 10 s XXL clip). With the step cache the same nominal FLOPs are
divided by a shorter time, so that MFU is an "effective" figure (marked so).

A configuration the machine cannot run is reported as "unavailable: <reason>"; without a GPU the
script says so and exits with status 2. ``--device cpu --sizes tiny`` is a smoke run of the
script's own logic for machines without a GPU (numbers meaningless).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

CONFIGS: dict[str, dict[str, Any]] = {
    "bf16-eager": {"precision": "bf16", "compile": False, "cache": False},
    "bf16-compiled": {"precision": "bf16", "compile": True, "cache": False},
    "fp8": {"precision": "fp8", "compile": False, "cache": False},
    "fp8-cache": {"precision": "fp8", "compile": False, "cache": True},
}
GIB = float(1 << 30)


def log(line: str) -> None:
    print(f"gpu: {line}", file=sys.stderr, flush=True)


def make_clip(path: Path, seconds: float, *, fps: int = 25, size: tuple[int, int] = (320, 240)) -> Path:
    """An H.264 clip of moving colour bars, ``seconds`` long, with no audio track."""
    import av
    import numpy as np

    w, h = size
    frames = int(round(seconds * fps))
    x = np.arange(w)[None, :, None]
    y = np.arange(h)[:, None, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            planes = [(x * 2 + i * 4) % 256, (y * 3 + i * 2) % 256, np.full((1, 1, 1), (i * 7) % 256)]
            rgb = np.concatenate([np.broadcast_to(p, (h, w, 1)) for p in planes], axis=2).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build(size: str, config: dict[str, Any], device, threshold: float):
    import torch

    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.random_models import random_components

    comps = random_components(size, device=device, dtype=torch.bfloat16, seed=0, log=log)
    engine = Engine(components=comps, precision="bf16")
    # The weights are already built (random): the options travel under demo=True for validate().
    return engine.configure(EngineConfig(
        demo=True, model="xl" if size == "tiny" else size, precision=config["precision"], compile=config["compile"],
        step_cache=threshold if config["cache"] else None, device=str(device),
    ))


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except AttributeError:
        pass


def measure(engine, video: Path, *, steps: int, repeat: int, warmup: int) -> dict[str, Any]:
    import torch

    from foleyserve.commands.profile import run_once
    from foleyserve.pipeline.requests import GenerationRequest

    records = []
    clip: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="foleyserve-gpu-") as tmp:
        req = GenerationRequest(video=video, prompt="a ball bouncing on a wooden floor", steps=steps, output=Path(tmp) / "out.mp4")
        for i in range(warmup + repeat):
            if engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(engine.device)
            # No per-step marks: they would synchronise the device after every step.
            record, clip = run_once(engine, req, max_seconds=15.0, step_times=False)
            peak = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
            log(f"  {'warm-up' if i < warmup else 'run'} {i + 1}: {record.total_seconds:.3f} s, dit {record.stages['dit']['seconds']:.3f} s")
            if i >= warmup:
                records.append((record, peak))
    dit = [r.stages["dit"]["seconds"] for r, _ in records]
    peaks = [p for _, p in records if p is not None]
    clip.pop("warnings", None)
    return {
        "clip": clip,
        "end_to_end_s": statistics.median(r.total_seconds for r, _ in records),
        "end_to_end_s_all": [r.total_seconds for r, _ in records],
        "dit_s": statistics.median(dit),
        "dit_s_all": dit,
        "dit_step_s": statistics.median(dit) / steps,  # the loop's time over its steps (set-up included)
        "stages_median_s": {k: statistics.median(r.stages[k]["seconds"] for r, _ in records) for k in records[0][0].stages},
        "peak_vram_bytes": max(peaks) if peaks else None,
        "step_cache": records[-1][0].step_cache,
    }


def run_suite(args: argparse.Namespace, device) -> list[dict[str, Any]]:
    from dit_step import dit_flops

    from foleyserve.pipeline.random_models import dit_config

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="foleyserve-gpu-clips-") as tmp:
        clips = {s: make_clip(Path(tmp) / f"clip_{s:g}s.mp4", s) for s in args.seconds}
        for size in args.sizes:
            for name in args.configs:
                config = CONFIGS[name]
                log(f"{size} {name}: building")
                start = time.perf_counter()
                try:
                    engine = build(size, config, device, args.cache_threshold)
                    reason = None
                except (ValueError, RuntimeError, NotImplementedError, ImportError) as e:
                    engine, reason = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
                log(f"{size} {name}: " + (f"unavailable: {reason}" if reason else f"built and configured in {time.perf_counter() - start:.1f} s"))
                for seconds, video in clips.items():
                    row: dict[str, Any] = {"size": size, "config": name, "seconds": seconds, **config,
                                           "cache_threshold": args.cache_threshold if config["cache"] else None}
                    rows.append(row)
                    if engine is None:
                        row["unavailable"] = reason
                        continue
                    log(f"{size} {name} {seconds:g} s clip:")
                    try:
                        row.update(measure(engine, video, steps=args.steps, repeat=args.repeat, warmup=args.warmup))
                    except (RuntimeError, NotImplementedError, ValueError) as e:
                        row["unavailable"] = f"failed: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
                        log(f"  {row['unavailable']}")
                        continue
                    c = row["clip"]
                    flops = dit_flops(dit_config(size), audio_len=c["latent_length"], visual_len=c["siglip_tokens"],
                                      sync_len=c["sync_tokens"], text_len=c["text_tokens"], batch=2)["total"]
                    row["dit_model_flops"] = flops * args.steps
                    row["dit_tflops_per_s"] = row["dit_model_flops"] / row["dit_s"] / 1e12
                    row["mfu"] = row["dit_tflops_per_s"] / args.peak_tflops
                    row["mfu_effective"] = bool(config["cache"])
                del engine
                _free(device)
    return rows


def format_rows(rows: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    from foleyserve.commands.profile import describe_machine

    lines = [
        f"# GPU suite: {args.steps} steps, CFG 4.5, random weights at real sizes; median of {args.repeat} after {args.warmup} warm-up",
        f"# {describe_machine(machine)}; MFU against {args.peak_tflops:g} TFLOP/s (bf16 matmul ceiling measured on H100/H200)",
        "",
        "| size | clip s | config | end-to-end s | DiT s | DiT s / steps, ms | peak VRAM GiB | DiT TFLOP (model count) | TFLOP/s | MFU | cache saved | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['size']} | {r['seconds']:g} | {r['config']} |"
        if "unavailable" in r:
            lines.append(f"{head} unavailable: {r['unavailable']} | | | | | | | | | |")
            continue
        step = f"{r['dit_step_s'] * 1e3:.1f}" if r.get("dit_step_s") else "-"
        vram = f"{r['peak_vram_bytes'] / GIB:.2f}" if r.get("peak_vram_bytes") else "-"
        saved = f"{r['step_cache']['saved_fraction']:.0%}" if r.get("step_cache") else "-"
        mfu = f"{r['mfu']:.1%}" + (" (effective)" if r["mfu_effective"] else "")
        c = r["clip"]
        note = f"La {c['latent_length']}, Lv {c['siglip_tokens']}, Ls {c['sync_tokens']}, Lt {c['text_tokens']}"
        lines.append(
            f"{head} {r['end_to_end_s']:.3f} | {r['dit_s']:.3f} | {step} | {vram} | {r['dit_model_flops'] / 1e12:.1f} | "
            f"{r['dit_tflops_per_s']:.1f} | {mfu} | {saved} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="xxl,xl", help="comma-separated: xxl, xl (tiny for a smoke run)")
    ap.add_argument("--seconds", default="8,10", help="clip lengths (default 8,10)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ap.add_argument("--repeat", type=int, default=3, help="counted runs (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1; the first compiles)")
    ap.add_argument("--cache-threshold", type=float, default=0.05, help="step cache threshold for fp8-cache (default 0.05)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (default 790)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only for a smoke run")
    ap.add_argument("--json", type=Path, help="write every number as JSON")
    ap.add_argument("--md", type=Path, help="write the markdown table to this file too")
    args = ap.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        args.seconds = [float(s) for s in args.seconds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seconds must be comma-separated numbers, got {args.seconds!r}")
    bad = [c for c in args.configs if c not in CONFIGS] + [s for s in args.sizes if s not in ("xxl", "xl", "tiny")]
    if bad:
        ap.error(f"unknown config or size: {', '.join(bad)}")
    if args.steps < 1 or args.repeat < 1 or args.warmup < 0 or any(s < 1 for s in args.seconds):
        ap.error("--steps and --repeat must be >= 1, --warmup >= 0, and clips at least 1 s long")

    import logging

    import torch

    logging.getLogger("foleyserve").setLevel(logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"bench/gpu.py needs a CUDA GPU and this machine has none usable (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}). Run it on the GPU machine, or pass --device cpu --sizes tiny "
            "for a smoke run of the script itself.",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and args.sizes != ["tiny"]:
        ap.error("--device cpu is only a smoke run: use it with --sizes tiny")
    from foleyserve.commands.profile import machine_info

    machine = machine_info()
    rows = run_suite(args, device)
    table = format_rows(rows, args, machine)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"tool": "bench/gpu.py", "argv": sys.argv[1:], "machine": machine,
                                         "machine_after": machine_info(), "peak_tflops": args.peak_tflops, "steps": args.steps,
                                         "rows": rows}, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
