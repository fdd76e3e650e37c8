"""Memory policies measured: peak device memory, host RAM and disk reads per request, per offload mode.

Each (mode, precision) runs in its own subprocess so host peaks do not leak between rows:
build the real-size networks with random weights (or the demo model), apply the policy and the
offload mode, run W warm-up requests and then R measured ones on the sample clip (or --video), and
report:

- peak device memory over the measured requests: the largest per-stage peak (each pipeline stage
  resets the CUDA peak counter, so reading ``max_memory_allocated`` after a request would give
  only its last stage; GPU only),
- host bytes holding the offloaded weights (one slab per model, the DiT blocks' in one) against the
  weights' own bytes, and what pinning each tensor separately would have taken (PyTorch's pinned
  allocator rounds each request up to a power of two),
- host peak RSS of the process and its RSS after the requests,
- bytes the process read from storage during the measured requests (``/proc/self/io``
  ``read_bytes``): offload that re-reads checkpoints per video shows up here; ours must read 0,
- median wall seconds per request.

    python bench/offload.py --model tiny                        # CPU smoke run: host RAM only
    python bench/offload.py --model xxl --device cuda --precisions bf16,fp8-weight-only,fp8

Prints a markdown table; ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("none", "stage", "sequential")


def _read_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(args: argparse.Namespace) -> dict:
    """One row, in this process."""
    import resource

    import torch

    from foleyserve import Engine, GenerationRequest
    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.demo import sample_clip_path
    from foleyserve.pipeline.pipeline import PRECISIONS, resolve_device
    from foleyserve.pipeline.stages import OVERALL

    device = resolve_device(args.device)
    start = time.perf_counter()
    if args.model == "tiny":
        engine = Engine.demo(device=device)
    else:
        from foleyserve.pipeline.random_models import random_components

        # With offload the weights' home is host RAM, as Engine.from_config loads them.
        home = device if args.mode == "none" else torch.device("cpu")
        comps = random_components(args.model, device=home, dtype=PRECISIONS[args.precision], seed=0)
        comps.device = device
        engine = Engine(components=comps, precision=args.precision)
    models = [engine.components.dit, engine.components.dac, engine.components.synchformer,
              engine.components.siglip, engine.components.clap]
    # Per-tensor pinning cost, computed before offload moves the weights (sizes do not change).
    per_tensor_pinned = sum(_pow2(t.numel() * t.element_size()) for m in models for t in [*m.parameters(), *m.buffers()])
    engine.configure(EngineConfig(demo=True, precision=args.precision, offload=args.mode, device=str(device)))
    lender = engine._lender
    build_s = time.perf_counter() - start
    video = args.video or str(sample_clip_path())
    request = lambda: GenerationRequest(video=video, prompt="footsteps", steps=args.steps, seed=0)  # noqa: E731
    for _ in range(args.warmup):
        engine.generate(request())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    read0 = _read_bytes()
    times, peaks = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        result = engine.generate(request())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peaks.append(result.memory[OVERALL]["device_peak_bytes"])
    read1 = _read_bytes()
    return {
        "model": args.model,
        "precision": args.precision,
        "offload": args.mode,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "steps": args.steps,
        "build_seconds": round(build_s, 2),
        "median_seconds": round(statistics.median(times), 4),
        "device_peak_bytes": max(peaks) if cuda else None,
        "device_resident_bytes": torch.cuda.memory_allocated(device) if cuda else None,
        "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_rss_bytes": _rss(),
        "host_weight_bytes": lender.host_bytes if lender is not None else None,
        "weight_tensor_bytes": lender.tensor_bytes if lender is not None else None,
        "per_tensor_pinned_bytes": per_tensor_pinned if lender is not None else None,
        "disk_read_bytes_per_request": (read1 - read0) // max(1, args.repeat) if read0 >= 0 else None,
    }


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "xl", "xxl"), default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="bf16", help="comma list of precision policies")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--video")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)))
        return 0

    rows = []
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            cmd = [
                sys.executable, __file__, "--one", "--model", args.model, "--device", args.device,
                "--precision", precision, "--mode", mode, "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--repeat", str(args.repeat),
            ] + (["--video", args.video] if args.video else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"precision": precision, "offload": mode, "error": tail})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"model {args.model}, {args.steps} steps, median of {args.repeat} after {args.warmup} warm-up\n")
    print("| precision | offload | s/request | device peak GiB | device resident GiB | host peak GiB | host RSS GiB | "
          "weights in host slabs GiB (tensors) | pinned per tensor would be GiB | disk read/request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | {r['offload']} | error: {r['error']} | | | | | | | |")
            continue
        disk = "-" if r["disk_read_bytes_per_request"] is None else f"{r['disk_read_bytes_per_request'] / 2**20:.1f} MiB"
        print(
            f"| {r['precision']} | {r['offload']} | {r['median_seconds']:.3f} | {_gib(r['device_peak_bytes'])} | "
            f"{_gib(r['device_resident_bytes'])} | {_gib(r['host_peak_bytes'])} | {_gib(r['host_rss_bytes'])} | "
            f"{_gib(r['host_weight_bytes'])} ({_gib(r['weight_tensor_bytes'])}) | {_gib(r['per_tensor_pinned_bytes'])} | {disk} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
