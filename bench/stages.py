"""Per-stage wall time and peak memory of one generation, median of N runs.

Device peaks are per stage (each stage resets the CUDA peak counter) and the largest over the runs;
the total row's device peak is the largest over every stage, i.e. the run's real peak.

    python bench/stages.py                        # demo model on the bundled sample clip
    python bench/stages.py --video clip.mp4 --steps 50 --repeats 5
    python bench/stages.py --model-dir DIR --model xl --precision bf16 --device cuda

The first run after start-up is a warm-up and is not counted (lazy initialisation, page cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--model", default="xxl", choices=("xxl", "xl"))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="mp4", choices=("mp4", "wav", "none"))
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    from foleyserve.pipeline.demo import sample_clip_path
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest
    from foleyserve.pipeline.stages import OVERALL, overall_device_peak

    engine = (
        Engine.from_pretrained(args.model_dir, model=args.model, precision=args.precision, device=args.device)
        if args.model_dir
        else Engine.demo(device=args.device)
    )
    video = args.video or sample_clip_path()
    out = None if args.output == "none" else Path("/tmp") / f"foleyserve_bench.{args.output}"
    req = GenerationRequest(video=video, prompt="a ball bouncing on a wooden floor", steps=args.steps, output=out)

    engine.generate(req)  # warm-up
    runs = [engine.generate(req) for _ in range(args.repeats)]
    stages = list(runs[0].timings)
    print(f"# {engine.components.name}, {video.name}, {runs[0].audio_seconds:.2f} s audio, {args.steps} steps, "
          f"{engine.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| stage | seconds (median) | min-max | host peak GiB (end of stage) | device peak GiB (max over runs) |")
    print("|---|---|---|---|---|")
    def gib(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**30:.2f}"

    for s in stages:
        secs = [r.timings[s] for r in runs]
        dev = overall_device_peak(r.memory[s]["device_peak_bytes"] for r in runs)
        host = max(r.memory[s]["host_peak_bytes"] for r in runs)
        print(f"| {s} | {statistics.median(secs):.3f} | {min(secs):.3f}-{max(secs):.3f} | {gib(host)} | {gib(dev)} |")
    total = [sum(r.timings.values()) for r in runs]
    peak = overall_device_peak(r.memory[OVERALL]["device_peak_bytes"] for r in runs)
    print(f"| **total** | {statistics.median(total):.3f} | {min(total):.3f}-{max(total):.3f} | | {gib(peak)} (all stages) |")
    if args.json:
        args.json.write_text(json.dumps([{"timings": r.timings, "memory": r.memory} for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
