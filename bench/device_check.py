#!/usr/bin/env python3
"""The one-shot device check: everything the GPU machine should tell us, in ONE call of at most 8 minutes.

A GPU is lent for 15 minutes per issue and 10 per command, so this runs once, phase by phase in order
of value, and never loses a result: the JSON (``--out``) is rewritten atomically after every
measurement. Each phase is skipped ("skipped: budget") when less of ``--budget-s`` is left than its
estimate; a phase that raises records "error" with the traceback's last lines and the run goes on;
a phase that overruns the budget is stopped by an alarm.

1. env             versions, GPU, TF32 flags; bf16 and fp8 row-wise matmul TFLOP/s; copy GB/s
2. kernels         Fp8Linear / fp8 tap layer vs their CPU fallback (M = 1000, 160, 154, 7); the k=3
                   conv five ways vs fp64; the Triton fp8 quantiser vs torch (bits); SDPA backends
3. dit_correctness XXL width, 2+2 blocks, 10 s shapes vs fp32 on the CPU: fp32 TF32 off/on, bf16,
                   fp8, fp8-weight-only; the official module (``--reference-repo``) in fp32 and bf16
4. step_times      XXL and XL x bf16/fp8/fp8-weight-only: eager step (CFG batch 2), MFU, peak, kernels
                   by kind, the step from one CUDA graph, the official step; a loop in sync-debug mode
5. end_to_end      a 10 s clip, random real-size XXL weights, 50 steps, bf16 and fp8: per-stage times
                   and device peaks (synthetic frames, no decode/mux, when PyAV is missing)
6. offload         stage and sequential vs resident: equality at 2 and 32 rows, step time, peaks, RSS
7. peak_vram       bf16, fp8 (from end_to_end) and sequential offload: the maximum over stages
8. compile         in a child process with a hard timeout: first call, graphs/breaks, compiled and
                   captured step, rel_l2 vs eager; compile artifacts saved next to the JSON (<= 15 MB)

``goals`` (the targets) and ``verdicts`` (each measured number, pass/fail) are in the JSON.
``--smoke`` runs every phase on the CPU at tiny sizes (numbers meaningless) to test the script.
How to run it on the device machine: BENCHMARKS.md, "GPU: the one-shot device check".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import _device_check_phases as P  # noqa: E402
from _device_check_phases import write_json  # noqa: E402
from _device_check_pipeline import (  # noqa: E402
    compile_child, phase_compile, phase_dit_correctness, phase_end_to_end, phase_offload, phase_peak_vram, phase_step_times,
)

# (goal, what it says, comparison, target, unit)
GOALS = [
    ("dit_bf16_s", "XXL 10 s clip, 50 steps, CFG: DiT seconds in bf16", "<=", 1.0, "s"),
    ("mfu_bf16", "the same DiT run's MFU (official FLOP count)", ">=", 0.45, "fraction"),
    ("dit_fp8_s", "XXL 10 s clip, 50 steps, CFG: DiT seconds in fp8", "<=", 0.7, "s"),
    ("end_to_end_s", "10 s clip end to end (every stage)", "<=", 1.5, "s"),
    ("peak_vram_bf16_gb", "peak device memory, bf16, max over stages", "<=", 16.0, "GB (1e9 bytes)"),
    ("peak_vram_fp8_gb", "peak device memory, fp8, max over stages", "<=", 11.0, "GB (1e9 bytes)"),
    ("peak_vram_sequential_gb", "peak device memory, sequential offload, max over stages", "<=", 4.0, "GB (1e9 bytes)"),
    ("step_over_official", "our XXL bf16 step time / the official module's, same run", "<", 1.0, "ratio"),
]


class PhaseTimeout(BaseException):
    """Raised by the alarm when the global budget is spent (a BaseException: phases catch Exception)."""


def _alarm(_signum, _frame):
    raise PhaseTimeout()


def _tail(exc: BaseException, lines: int = 8) -> list[str]:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip().splitlines()[-lines:]


class Check:
    """The run's state: plan, device, budget, the results tree and its file."""

    def __init__(self, args: argparse.Namespace, plan: P.Plan, device: torch.device) -> None:
        self.args, self.plan, self.device = args, plan, device
        self.out: Path = args.out
        self.t0 = time.monotonic()
        self.peak_tflops = args.peak_tflops
        self.cache: dict[str, Any] = {}
        self.official, self.official_note, self._official_tried = None, None, False
        self.results: dict[str, Any] = {
            "tool": "bench/device_check.py", "argv": sys.argv[1:], "smoke": plan.smoke,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "budget_s": args.budget_s, "peak_tflops": args.peak_tflops,
            "plan": asdict(plan),
            "goals": {g: {"what": w, "op": op, "target": t, "unit": u} for g, w, op, t, u in GOALS},
            "phases": {},
        }

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        self.results["verdicts"] = verdicts(self.results, self.plan)
        write_json(self.out, self.results)

    def item(self, sec: dict, key: str, fn: Callable[[], Any]) -> None:
        """Run one measurement; its result (or its error) lands in ``sec[key]`` and on disk."""
        try:
            value = fn()
            if value is not None:
                sec[key] = value
        except Exception as e:  # noqa: BLE001 - one failed measurement must not cost the others
            err = {"error": P.first_line(e), "traceback": _tail(e)}
            if isinstance(sec.get(key), dict):
                sec[key].update(err)
            else:
                sec[key] = err
            self.log(f"  {key}: {err['error']}")
        finally:
            self.save()

    def get_official(self):
        """The official DiT module, imported once on first use (diffusers takes seconds to import)."""
        if not self._official_tried:
            self._official_tried = True
            repo = self.args.reference_repo
            if repo is None:
                self.official_note = "skipped: no --reference-repo"
            else:
                try:
                    self.official = P.import_official(Path(repo))
                except Exception as e:  # noqa: BLE001
                    self.official_note = f"unavailable: {P.first_line(e)}"
            self.results["official"] = self.official_note or f"imported from {repo}"
        return self.official


# ----------------------------------------------------------------------------- phase 1: env


def phase_env(ctx: Check, sec: dict) -> None:
    import importlib.metadata as md
    import platform

    dev, plan = ctx.device, ctx.plan
    cuda = dev.type == "cuda"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for pkg in ("triton", "transformers", "diffusers", "einops", "av", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    sec["versions"] = versions
    sec["pyav"] = ctx.cache["av"]
    sec["tf32_as_found"] = ctx.cache["tf32"]
    sec["tf32_note"] = "forced off for every fp32 number below, as Engine.configure does on CUDA; dit_correctness also measures fp32 with TF32 on"
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        sec["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_bytes": p.total_memory, "l2_bytes": getattr(p, "L2_cache_size", None)}
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
            sec["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                               text=True, timeout=15).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            sec["nvidia_smi"] = f"unavailable: {e}"
    else:
        sec["gpu"] = "skipped: no cuda"
    try:
        from foleyserve.commands.profile import machine_info

        sec["machine"] = machine_info()
    except Exception as e:  # noqa: BLE001 - informative only
        sec["machine"] = f"unavailable: {P.first_line(e)}"
    n = plan.matmul_n
    ctx.item(sec, "bf16_matmul", lambda: _matmul(ctx, n, fp8=False))
    for fast in (False, True):
        key = "fp8_rowwise_scaled_mm" + ("_fast_accum" if fast else "")
        ctx.item(sec, key, lambda f=fast: _matmul(ctx, n, fp8=True, fast=f) if cuda else "skipped: no cuda")
    ctx.item(sec, "copy_d2d", lambda: _copy(ctx, "d2d"))
    for kind in ("h2d_pinned", "h2d_pageable"):
        ctx.item(sec, "copy_" + kind, lambda k=kind: _copy(ctx, k) if cuda else "skipped: no cuda")


def _matmul(ctx: Check, n: int, *, fp8: bool, fast: bool = False) -> dict[str, Any]:
    dev = ctx.device
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)  # random data: zeros run faster and would flatter the ceiling
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
        fn = lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)  # noqa: E731
    else:
        ab, bb = a.bfloat16(), b.bfloat16()
        fn = lambda: ab @ bb  # noqa: E731
    r = P.timeit(fn, dev, ctx.plan.warmup, ctx.plan.iters)
    return {"n": n, **r, "tflops": 2 * n**3 / (r["median_ms"] * 1e-3) / 1e12}


def _copy(ctx: Check, kind: str) -> dict[str, Any]:
    dev, nbytes = ctx.device, ctx.plan.copy_bytes
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if kind == "d2d":
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
        moved = 2 * nbytes  # read plus write, as METHOD.md counts a device copy
    else:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory() if kind == "h2d_pinned" else torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        moved = nbytes
    r = P.timeit(lambda: dst.copy_(src, non_blocking=True), dev, ctx.plan.warmup, ctx.plan.iters)
    return {"bytes": nbytes, **r, "gb_per_s": moved / (r["median_ms"] * 1e-3) / 1e9}


# ----------------------------------------------------------------------------- goals


def _dig(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def verdicts(results: dict, plan: P.Plan) -> dict[str, Any]:
    """Every measured number a goal can be judged on, with pass/fail; ``pass`` is the best of them."""
    ph = {k: v.get("results", {}) for k, v in results.get("phases", {}).items()}
    big, gb = plan.sizes[0], P.GB
    st = lambda prec, mode, key: _dig(ph, "step_times", f"{big}/{prec}", mode, key)  # noqa: E731
    cand: dict[str, list[tuple[str, Any]]] = {
        "dit_bf16_s": [("compile: compiled+captured step x steps", _dig(ph, "compile", "child", "dit_s_per_clip")),
                       ("step_times: eager step from one CUDA graph x steps", st("bf16", "cuda_graph", "dit_s_per_clip")),
                       ("step_times: eager step x steps", st("bf16", "eager", "dit_s_per_clip")),
                       ("end_to_end: dit stage (eager)", _dig(ph, "end_to_end", "bf16", "dit_s"))],
        "mfu_bf16": [("compile: compiled+captured step", _dig(ph, "compile", "child", "mfu")),
                     ("step_times: CUDA graph", st("bf16", "cuda_graph", "mfu")),
                     ("step_times: eager", st("bf16", "eager", "mfu"))],
        "dit_fp8_s": [("step_times: fp8 eager step from one CUDA graph x steps", st("fp8", "cuda_graph", "dit_s_per_clip")),
                      ("step_times: fp8 eager step x steps", st("fp8", "eager", "dit_s_per_clip")),
                      ("end_to_end: fp8 dit stage (eager)", _dig(ph, "end_to_end", "fp8", "dit_s"))],
        "end_to_end_s": [(f"end_to_end: {p} stages" + ("" if _dig(ph, "end_to_end", "pyav", "available") else " (no decode/mux)"),
                          _dig(ph, "end_to_end", p, "stages_s")) for p in ("bf16", "fp8")],
        "peak_vram_bf16_gb": [("end_to_end: bf16", _dig(ph, "end_to_end", "bf16", "device_peak_bytes"))],
        "peak_vram_fp8_gb": [("end_to_end: fp8", _dig(ph, "end_to_end", "fp8", "device_peak_bytes"))],
        "peak_vram_sequential_gb": [("peak_vram: sequential offload", _dig(ph, "peak_vram", "sequential_offload", "device_peak_bytes"))],
        "step_over_official": [("step_times: eager / official", st("bf16", "official", "ours_eager_over_official")),
                               ("step_times: CUDA graph / official", st("bf16", "official", "ours_cuda_graph_over_official"))],
    }
    out: dict[str, Any] = {"note": "smoke run: tiny CPU numbers, verdicts meaningless"} if plan.smoke else {}
    for goal, _what, op, target, _unit in GOALS:
        rows = []
        for source, value in cand[goal]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if goal.startswith("peak_vram"):
                value = value / gb
            ok = value <= target if op == "<=" else value >= target if op == ">=" else value < target
            rows.append({"source": source, "value": round(value, 4), "pass": ok})
        out[goal] = {"target": f"{op} {target}", "measured": rows, "pass": any(r["pass"] for r in rows) if rows else None}
    return out


# ----------------------------------------------------------------------------- phase: encoders


def phase_encoders(ctx: Check, sec: dict) -> None:
    """SigLIP2 and Synchformer in fp32 (TF32 off and on) and under fp16/bf16 autocast: the
    official pipeline runs Synchformer under fp16 autocast on CUDA, which never ran before."""
    import encoder_precision as E

    if ctx.plan.smoke:  # the fixture's tiny Synchformer only: real-size SigLIP2 is minutes on 2 cores
        shared = Path(os.environ.get("FOLEYSERVE_SHARED", REPO.parent / "shared"))
        fixture = shared / "reference" / "fixtures" / "tiny_synchformer_visual_weights.safetensors"
        ctx.item(sec, "synchformer_fixture", lambda: E.measure(ctx.device, fixture=fixture, max_sync_frames=16,
                                                               max_siglip_frames=1, encoders=("synchformer",)))
        return
    ctx.item(sec, "real_size_random", lambda: E.measure(ctx.device, max_sync_frames=48, max_siglip_frames=40))


# ----------------------------------------------------------------------------- the run


PHASES: list[tuple[str, Callable[[Check, dict], None], float, float]] = [
    # name, function, estimate on the H200 (s), estimate in --smoke on 2 CPU cores (s)
    ("env", phase_env, 15, 2),
    ("kernels", P.phase_kernels, 25, 4),
    ("dit_correctness", phase_dit_correctness, 35, 4),
    ("step_times", phase_step_times, 70, 8),
    ("end_to_end", phase_end_to_end, 40, 8),
    ("offload", phase_offload, 45, 4),
    ("peak_vram", phase_peak_vram, 25, 4),
    ("encoders", phase_encoders, 15, 8),
    ("compile", phase_compile, 120, 10),
]


def cuda_alive(device: torch.device) -> bool:
    """False once the CUDA context is poisoned (an illegal access is sticky: every later call fails)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except RuntimeError:
        return False


def run_phase(ctx: Check, name: str, fn: Callable[[Check, dict], None], estimate: float, selected: set[str]) -> None:
    if name not in selected and name in ctx.results["phases"]:
        return  # measured before a restart (--resume): keep it
    entry: dict[str, Any] = {"estimate_s": estimate}
    ctx.results["phases"][name] = entry
    if name not in selected:
        entry["status"] = "skipped: not selected (--phases)"
    elif ctx.left() < estimate:
        entry.update(status="skipped: budget", left_s=round(ctx.left(), 1))
    if "status" in entry:
        ctx.save()
        ctx.log(f"{name}: {entry['status']}")
        return
    ctx.log(f"{name}: start ({ctx.left():.0f} s of budget left)")
    entry["status"] = "running"
    sec = entry["results"] = {}
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 1.0))
    try:
        fn(ctx, sec)
        entry["status"] = "ok"
    except PhaseTimeout:
        entry.update(status="error", error="stopped: the global --budget-s ran out during this phase")
    except Exception as e:  # noqa: BLE001 - the next phases still run
        entry.update(status="error", error=P.first_line(e), traceback=_tail(e))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = round(time.monotonic() - start, 2)
        entry["item_errors"] = _count_errors(sec)
        P.free(ctx.device)
        ctx.save()
    ctx.log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s ({entry['item_errors']} item errors)")


def restart_without(ctx: Check, done: str) -> None:
    """The CUDA context is lost: go on in a fresh process with the phases not yet run and the
    budget left, reading back this run's JSON (``--resume``), so one bad kernel costs one phase."""
    names = [p[0] for p in PHASES]
    rest = [n for n in names[names.index(done) + 1:] if n in set(ctx.args.phases.split(","))]
    ctx.results.setdefault("restarts", []).append({"after_phase": done, "left_s": round(ctx.left(), 1), "then": rest})
    ctx.save()
    ctx.log(f"CUDA context lost after {done}: restarting for {', '.join(rest) or 'nothing'}")
    if not rest:
        return
    argv = [a for a in sys.argv[1:]]
    for flag in ("--phases", "--budget-s", "--resume"):  # replaced below (both "--x v" and "--x=v" forms)
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv, "--phases", ",".join(rest),
                              "--budget-s", str(max(ctx.left(), 1.0)), "--resume", str(ctx.out)])


def _count_errors(tree: Any) -> int:
    if isinstance(tree, dict):
        return int("error" in tree and "traceback" in tree) + sum(_count_errors(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(_count_errors(v) for v in tree)
    return 0


def summary(ctx: Check) -> str:
    lines = [f"device check: {ctx.results['elapsed_s']:.1f} s, {ctx.device}" + (" (smoke)" if ctx.plan.smoke else ""),
             "| phase | status | s | item errors |", "|---|---|---|---|"]
    for name, e in ctx.results["phases"].items():
        lines.append(f"| {name} | {e.get('status')} | {e.get('seconds', '-')} | {e.get('item_errors', '-')} |")
    lines += ["", "| goal | target | pass | measured |", "|---|---|---|---|"]
    for goal, v in ctx.results["verdicts"].items():
        if isinstance(v, dict):
            got = "; ".join(f"{r['source']}: {r['value']}" for r in v["measured"]) or "-"
            lines.append(f"| {goal} | {v['target']} | {v['pass']} | {got} |")
    lines.append(f"wrote {ctx.out}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT") else REPO / "bench/results/device_check.json"
    ap.add_argument("--out", type=Path, default=default_out, help=f"results JSON (default {default_out})")
    ap.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole check (default 470)")
    ap.add_argument("--smoke", action="store_true", help="every phase on the CPU at tiny sizes (tests the script)")
    ap.add_argument("--device", help="cuda (default) or cpu (smoke runs are always cpu)")
    ap.add_argument("--phases", default=",".join(p[0] for p in PHASES), help="comma-separated subset, in any order")
    ap.add_argument("--reference-repo", type=Path, help="HunyuanVideo-Foley source folder (needs diffusers and einops)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (bf16 8192^3 measured on the H200)")
    ap.add_argument("--compile-timeout-s", type=float, default=240.0, help="hard limit of the compile child (default 240)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager in --smoke, which "
                                              "still traces the whole step: Inductor's CPU codegen takes ~100 s on 2 cores)")
    ap.add_argument("--load-artifacts", type=Path, help="compile artifacts from an earlier run, loaded before compiling")
    ap.add_argument("--no-av", action="store_true", help="act as if PyAV were missing (synthetic frames, no decode/mux)")
    ap.add_argument("--resume", type=Path, help="continue the results in this JSON (used by the restart after a lost CUDA context)")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = "cpu" if args.smoke else (args.device or "cuda")
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    unknown = set(args.phases.split(",")) - {p[0] for p in PHASES}
    if unknown:
        ap.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # Tiny ops on a small, shared CPU: OpenMP threads only spin against each other (a tiny
        # step took 170 ms on 2 threads and 20 ms on 1 with the machine busy).
        torch.set_num_threads(1)
    if args.compile_child:
        return compile_child(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench/device_check.py: no usable CUDA GPU here (torch {torch.__version__}); run it on the device "
              "machine, or use --smoke for a CPU run of the script itself", file=sys.stderr)
        return 2
    # Recorded before anything changes them; every fp32 number is then taken with TF32 off.
    tf32 = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        P.set_tf32(False)
    ctx = Check(args, P.make_plan(args.smoke), device)
    if args.resume and args.resume.is_file():
        previous = json.loads(args.resume.read_text())
        ctx.results["phases"] = previous.get("phases", {})
        ctx.results["restarts"] = previous.get("restarts", [])
        ctx.results["first_started"] = previous.get("first_started", previous.get("started"))
        if "official" in previous:
            ctx.results["official"] = previous["official"]
    ctx.cache.update(tf32=tf32, av=P.prepare_av(force_stub=args.no_av))
    signal.signal(signal.SIGALRM, _alarm)
    selected = set(args.phases.split(","))
    ctx.log(f"device check on {device}, budget {args.budget_s:.0f} s, writing {args.out}")
    for name, fn, full, smoke in PHASES:
        run_phase(ctx, name, fn, smoke if args.smoke else full, selected)
        # The environment variable lets the CPU tests walk the restart path; nothing else sets it.
        lost = os.environ.get("DEVICE_CHECK_TEST_LOSE_CONTEXT_AFTER") == name
        if name in selected and (lost or not cuda_alive(device)):
            restart_without(ctx, name)
            break
    ctx.results["finished"] = True
    ctx.save()
    print(summary(ctx), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
