"""``foleyserve profile``: where the time and memory of one generation go, stage by stage.

Runs the whole pipeline (decode -> SigLIP2 / Synchformer / CLAP -> DiT -> DAC -> write/mux) K times
after W warm-up runs and prints, per stage, the median wall seconds and the peak host and device
memory, as a markdown table (optionally JSON too). The DiT is also reported per denoising step.

The engine comes from the official weights (``--model-dir``), the tiny demo model (``--demo``), or
the real architecture with random weights (``--random-weights xl|xxl``), which gives true timings
without the official files. The functions here are also what ``bench/policies.py`` and
``bench/device_check.py`` build on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GIB = float(1 << 30)
# The stages of one generation, in pipeline order (the engine's StageTimer names).
STAGES = ("decode", "siglip2", "synchformer", "clap", "dit", "dac", "write")
STAGE_LABELS = {
    "decode": "decode (8 + 25 fps)",
    "siglip2": "siglip2",
    "synchformer": "synchformer",
    "clap": "clap",
    "dit": "dit (total)",
    "dac": "dac",
    "write": "write / mux",
}
PLAIN_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _usage_error() -> type[Exception]:
    from foleyserve.cli import UsageError

    return UsageError


# ----------------------------------------------------------------------------- machine info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_details() -> dict[str, Any]:
    """CPU family/model and the instruction sets that decide CPU GEMM speed in each dtype."""
    details: dict[str, Any] = {}
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in details:
                    details["family" if key == "cpu family" else "model"] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    details["flags_of_note"] = [w for w in wanted if w in flags]
                    break
    except OSError:
        pass
    return details


def machine_info() -> dict[str, Any]:
    """What a benchmark number depends on: CPU, cores, memory, torch, GPU, and how busy the box was."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        **{f"cpu_{k}": v for k, v in _cpu_details().items()},
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total_bytes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_device": None,
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            cuda_device=torch.cuda.get_device_name(),
            cuda_memory_bytes=props.total_memory,
            cuda_version=torch.version.cuda,
            cuda_capability=f"{props.major}.{props.minor}",
        )
    return info


def describe_machine(info: dict[str, Any]) -> str:
    mem = f", {info['memory_bytes'] / GIB:.0f} GiB" if info.get("memory_bytes") else ""
    gpu = f", GPU {info['cuda_device']} (CUDA {info.get('cuda_version')})" if info.get("cuda_device") else ", no GPU"
    load = f", load average {info['load_average'][0]:.1f}" if info.get("load_average") else ""
    flags = info.get("cpu_flags_of_note")
    isa = f" [{' '.join(flags)}]" if flags else ""
    return (
        f"{info['cpu']}{isa}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads){mem}{gpu}; "
        f"torch {info['torch']}, Python {info['python']}{load}"
    )


# ----------------------------------------------------------------------------- engine


@dataclass
class EngineSpec:
    """Which model to profile and with which cost options."""

    source: str  # "demo", "model-dir" or "random"
    model: str = "xxl"  # xxl/xl for model-dir; tiny/xl/xxl for random
    model_dir: Path | None = None
    precision: str | None = None  # None: fp32 on CPU, bf16 on a GPU
    step_cache: float | None = None
    compile: bool = False
    offload: str = "none"
    device: str = "auto"
    seed: int = 0
    siglip_dir: Path | None = None
    clap_dir: Path | None = None


def default_precision(device: Any) -> str:
    return "fp32" if getattr(device, "type", str(device)) == "cpu" else "bf16"


def _load_errors() -> tuple[type[BaseException], ...]:
    """Problems with the user's files: missing/damaged weights, an unreadable video."""
    from foleyserve.media import MediaError
    from foleyserve.models.loading import CheckpointError
    from foleyserve.pipeline.model_dir import ModelFolderError

    return (ModelFolderError, CheckpointError, MediaError)


def _option_errors() -> tuple[type[BaseException], ...]:
    """An option this engine, checkout or device cannot apply."""
    from foleyserve.config import ConfigError
    from foleyserve.pipeline.requests import RequestError

    return (ConfigError, RequestError, NotImplementedError, ImportError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_engine(spec: EngineSpec, log: Callable[[str], None] | None = None):
    """(engine, notes). Options the engine could not apply raise UsageError naming the reason;
    options it silently ignored are listed in ``notes`` (so a table never claims what did not run)."""
    import torch

    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine, resolve_device

    UsageError = _usage_error()
    notes: list[str] = []
    try:
        device = resolve_device(spec.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    precision = spec.precision or default_precision(device)
    config_kwargs = dict(
        precision=precision, step_cache=spec.step_cache, compile=spec.compile, offload=spec.offload, device=str(device)
    )
    what = f"precision={precision}, step_cache={spec.step_cache}, compile={spec.compile}, offload={spec.offload}"

    try:
        if spec.source == "random" and spec.model != "tiny":
            from foleyserve.pipeline.random_models import random_components

            # Build the DiT straight in the dtype the policy computes in: XL in fp32 is 11.6 GB.
            base = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
            # With offload the weights' home is host RAM, as Engine.from_config loads them.
            home = device if spec.offload == "none" else torch.device("cpu")
            comps = random_components(spec.model, device=home, dtype=base, seed=spec.seed, log=log)
            comps.device = device
            engine = Engine(components=comps, precision=precision if precision in PLAIN_DTYPES else "bf16")
            engine.step_cache = spec.step_cache
            # EngineConfig.validate() asks for a weight source; these weights are already built
            # (random, like the demo's), so the options travel under demo=True.
            engine = engine.configure(EngineConfig(demo=True, model=spec.model, **config_kwargs))
        elif spec.source in ("demo", "random"):
            engine = Engine.from_config(EngineConfig(demo=True, **config_kwargs))
        else:
            engine = Engine.from_config(
                EngineConfig(model_dir=spec.model_dir, model=spec.model, siglip_dir=spec.siglip_dir, clap_dir=spec.clap_dir, **config_kwargs)
            )
    except _load_errors() as e:
        raise UsageError(str(e)) from None
    except (*_option_errors(), RuntimeError) as e:
        # RuntimeError: e.g. a kernel this device lacks (fp8 matmuls on an old GPU).
        raise UsageError(f"{what} is unavailable on {device}: {_first_line(e)}") from None

    # A table must never claim an option that did not take effect.
    if engine.precision != precision:
        notes.append(f"asked for precision {precision} but the engine reports {engine.precision}")
    if engine.step_cache != spec.step_cache:
        notes.append(f"asked for step cache {spec.step_cache} but the engine reports {engine.step_cache}")
    return engine, notes


# ----------------------------------------------------------------------------- measuring


@dataclass
class RunRecord:
    stages: dict[str, dict[str, Any]]  # name -> {seconds, host_peak_bytes, device_peak_bytes}
    total_seconds: float
    step_seconds: list[float]  # wall time of denoising steps 2..N (step 1 includes per-request set-up)
    step_cache: dict | None
    device_peak_bytes: int | None = None  # over every stage of the run (None without a device)


@dataclass
class ProfileResult:
    machine: dict[str, Any]
    settings: dict[str, Any]
    clip: dict[str, Any]
    runs: list[RunRecord]
    notes: list[str] = field(default_factory=list)

    def stage_names(self) -> list[str]:
        seen = [s for s in STAGES if any(s in r.stages for r in self.runs)]
        extra = [s for r in self.runs for s in r.stages if s not in STAGES]
        return seen + sorted(set(extra))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.stage_names():
            recs = [r.stages[name] for r in self.runs if name in r.stages]
            secs = [float(x["seconds"]) for x in recs]
            dev = [x["device_peak_bytes"] for x in recs if x.get("device_peak_bytes") is not None]
            out[name] = {
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "host_peak_bytes": max(int(x["host_peak_bytes"]) for x in recs),
                "device_peak_bytes": max(dev) if dev else None,
            }
        steps = [s for r in self.runs for s in r.step_seconds]
        per_step = [statistics.median(r.step_seconds) for r in self.runs if r.step_seconds]
        if per_step:
            out["dit_per_step"] = {"median_s": statistics.median(per_step), "min_s": min(steps), "max_s": max(steps), "samples": len(steps)}
        totals = [r.total_seconds for r in self.runs]
        out["total"] = {
            "median_s": statistics.median(totals), "min_s": min(totals), "max_s": max(totals),
            "device_peak_bytes": max((r.device_peak_bytes for r in self.runs if r.device_peak_bytes is not None), default=None),
        }
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "tool": "foleyserve profile",
            "machine": self.machine,
            "settings": self.settings,
            "clip": self.clip,
            "summary": self.summary(),
            "runs": [
                {"stages": r.stages, "total_s": r.total_seconds, "step_s": r.step_seconds, "step_cache": r.step_cache,
                 "device_peak_bytes": r.device_peak_bytes}
                for r in self.runs
            ],
            "notes": self.notes,
        }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteOutput(RuntimeError):
    """The denoiser produced NaN or inf latents: the precision overflowed on these weights."""


def run_once(engine, request, *, max_seconds: float, step_times: bool = True) -> tuple[RunRecord, dict[str, Any]]:
    """One generation through the staged API, timed stage by stage.

    ``step_times`` records when each denoising step ends; on a GPU that waits for the device after
    every step, which keeps the host from queueing the next step early (a small bubble per step).
    Raises NonFiniteOutput instead of writing NaN audio (which the AAC encoder rejects anyway)."""
    from foleyserve.pipeline.stages import StageTimer, overall_device_peak, split_overall

    device = engine.device
    marks: list[float] = []

    def progress(stage: str, _done: int, _total: int) -> None:
        if stage == "denoise":
            # Steps are queued asynchronously on a GPU: wait so each mark is when the step ended.
            _sync(device)
            marks.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    timer = StageTimer(device)
    decoded = engine.decode(request.video, timer, max_seconds=max_seconds)
    job = engine.prepare(request, decoded=decoded)
    latents = engine.sample_jobs([job], progress=progress if step_times else None)[0]
    if not bool(latents.isfinite().all()):
        raise NonFiniteOutput(
            f"the denoiser produced non-finite latents (NaN/inf) under precision {engine.precision}: "
            "the activations overflowed that dtype on these weights"
        )
    result = engine.finish(job, latents)
    _sync(device)
    total = time.perf_counter() - start
    # Each timer's "overall" entry covers only its own stages: drop both, take the peak over all.
    stages, _ = split_overall({**timer.as_dict(), **result.memory})
    steps = [b - a for a, b in zip(marks, marks[1:])]
    clip = {
        "video_seconds": round(decoded.duration, 3),
        "audio_seconds": round(result.audio_seconds, 3),
        "latent_length": job.latent_length,
        "siglip_tokens": int(job.visual.siglip.shape[1]),
        "sync_tokens": int(job.visual.sync.shape[1]),
        "text_tokens": int(job.text.text.shape[1]),
        "warnings": list(result.warnings),
    }
    peak = overall_device_peak(s["device_peak_bytes"] for s in stages.values())
    record = RunRecord(stages=stages, total_seconds=total, step_seconds=steps, step_cache=engine.last_step_cache_report,
                       device_peak_bytes=peak)
    return record, clip


def profile_engine(
    engine,
    video: str | Path,
    *,
    steps: int = 50,
    guidance: float = 4.5,
    seed: int = 0,
    prompt: str = "a ball bouncing on a wooden floor",
    repeat: int = 3,
    warmup: int = 1,
    max_seconds: float = 15.0,
    output: str = "mp4",
    log: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Time ``repeat`` generations after ``warmup`` uncounted ones."""
    from foleyserve.pipeline.requests import GenerationRequest

    say = log or (lambda _line: None)
    runs: list[RunRecord] = []
    clip: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="foleyserve-profile-") as tmp:
        out = None if output == "none" else Path(tmp) / f"out.{output}"
        req = GenerationRequest(video=video, prompt=prompt, steps=steps, guidance=guidance, seed=seed, output=out)
        for i in range(warmup + repeat):
            label = f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i - warmup + 1}/{repeat}"
            record, clip = run_once(engine, req, max_seconds=max_seconds)
            say(f"{label}: {record.total_seconds:.3f} s")
            if i >= warmup:
                runs.append(record)
            gc.collect()
    settings = {
        "model": engine.components.name,
        "device": str(engine.device),
        "precision": engine.precision,
        "step_cache": engine.step_cache,
        "compile": bool(getattr(engine, "compiled", False)),
        "offload": getattr(engine, "offload", "none"),
        "policy": getattr(engine, "policy_report", None),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "prompt": prompt,
        "video": str(video),
        "max_seconds": max_seconds,
        "output": output,
        "repeat": repeat,
        "warmup": warmup,
    }
    notes = []
    cut = max_seconds < float(clip.get("video_seconds") or 0.0)
    if cut:
        notes.append(f"--seconds {max_seconds:g}: only the first {clip.get('audio_seconds')} s of the "
                     f"{clip.get('video_seconds')} s video are generated")
    for warning in clip.pop("warnings", []):
        # The engine cannot know the clip was cut on purpose: its "rest is silent" warning is ours above.
        if not (cut and "silent" in warning):
            notes.append(warning)
    return ProfileResult(machine=machine_info(), settings=settings, clip=clip, runs=runs, notes=notes)


# ----------------------------------------------------------------------------- output


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def format_table(result: ProfileResult) -> str:
    """The per-stage markdown table with a header naming model, clip, settings and machine."""
    s = result.settings
    c = result.clip
    summary = result.summary()
    cache = "off" if s["step_cache"] is None else f"threshold {s['step_cache']}"
    lines = [
        f"# foleyserve profile: {s['model']}, {s['precision']}, step cache {cache}, "
        f"compile {'on' if s.get('compile') else 'off'}, offload {s.get('offload', 'none')}, {s['device']}",
        f"# clip {Path(s['video']).name}: {c.get('video_seconds')} s video -> {c.get('audio_seconds')} s audio "
        f"(latent {c.get('latent_length')}, SigLIP2 {c.get('siglip_tokens')}, sync {c.get('sync_tokens')}, "
        f"text {c.get('text_tokens')} tokens); {s['steps']} steps, CFG {s['guidance']}, output {s['output']}",
        f"# median of {s['repeat']} runs after {s['warmup']} warm-up; {describe_machine(result.machine)}",
        "",
        "| stage | seconds (median) | min-max | host peak GiB (end of stage) | device peak GiB (in stage) |",
        "|---|---|---|---|---|",
    ]
    for name in result.stage_names():
        st = summary[name]
        lines.append(
            f"| {STAGE_LABELS.get(name, name)} | {st['median_s']:.3f} | {st['min_s']:.3f}-{st['max_s']:.3f} | "
            f"{_gib(st['host_peak_bytes'])} | {_gib(st['device_peak_bytes'])} |"
        )
        if name == "dit" and "dit_per_step" in summary:
            ps = summary["dit_per_step"]
            lines.append(
                f"| dit per step (steps 2-{s['steps']}) | {ps['median_s']:.4f} | {ps['min_s']:.4f}-{ps['max_s']:.4f} | | |"
            )
    tot = summary["total"]
    peak = tot.get("device_peak_bytes")
    lines.append(
        f"| **total** (wall) | {tot['median_s']:.3f} | {tot['min_s']:.3f}-{tot['max_s']:.3f} | | "
        f"{'' if peak is None else _gib(peak) + ' (max over stages)'} |"
    )
    caches = [r.step_cache for r in result.runs if r.step_cache]
    if caches:
        lines.append("")
        lines.append(f"step cache (last run): {json.dumps(caches[-1])}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- CLI


def add_source_args(p: argparse.ArgumentParser, *, random_sizes: tuple[str, ...]) -> argparse._MutuallyExclusiveGroup:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="tiny random-weight demo model (the default)")
    src.add_argument("--random-weights", choices=random_sizes, metavar="SIZE",
                     help=f"the real architecture at this size with seeded random weights: {', '.join(random_sizes)}")
    return src


def _bounded(kind: type, minimum: float, what: str, bound: str):
    """An argparse type: ``kind(text)`` that is at least ``minimum``, with a message naming the bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= minimum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive_int = _bounded(int, 1, "an integer", "at least 1")
non_negative_int = _bounded(int, 0, "an integer", "0 or more")
non_negative_float = _bounded(float, 0.0, "a number", "0 or more")


def seconds_arg(text: str) -> float:
    value = non_negative_float(text)
    if value < 0.64:
        raise argparse.ArgumentTypeError(f"must be at least 0.64 s (Synchformer needs 16 frames at 25 fps), got {text}")
    return value


def check_output_file(path: Path | None, what: str) -> None:
    if path is None:
        return
    UsageError = _usage_error()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: folder {parent} is not writable")


def check_video(path: Path | None) -> Path:
    from foleyserve.pipeline.demo import sample_clip_path

    UsageError = _usage_error()
    video = path or sample_clip_path()
    if not video.exists():
        raise UsageError(f"video {video} does not exist; check the path (default: the bundled sample clip)")
    if video.is_dir():
        raise UsageError(f"video {video} is a folder; pass a video file")
    return video


def add_parser(sub: argparse._SubParsersAction) -> None:
    from foleyserve.config import OFFLOAD_MODES, PRECISION_NAMES

    p = sub.add_parser(
        "profile",
        help="time every pipeline stage (decode, encoders, DiT, DAC, mux) and report peak memory",
        description=(
            "Run the whole pipeline K times after W warm-ups and print the median wall seconds and peak host/device "
            "memory of each stage (decode, siglip2, synchformer, clap, dit total and per step, dac, write/mux) as a "
            "markdown table, optionally as JSON with machine details."
        ),
    )
    src = add_source_args(p, random_sizes=("tiny", "xl", "xxl"))
    src.add_argument("--model-dir", type=Path, help="folder with the official HunyuanVideo-Foley weights")
    p.add_argument("--model", choices=("xxl", "xl"), default="xxl", help="denoiser of the model folder (default xxl)")
    p.add_argument("--siglip-dir", type=Path, help="local google/siglip2-base-patch16-512 folder (with --model-dir)")
    p.add_argument("--clap-dir", type=Path, help="local laion/larger_clap_general folder (with --model-dir)")
    p.add_argument("--video", type=Path, help="input video (default: the bundled 4 s sample clip)")
    p.add_argument("--seconds", type=seconds_arg, default=15.0, help="use at most this many seconds of the video (default 15)")
    p.add_argument("--precision", choices=PRECISION_NAMES, help="DiT precision policy (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--step-cache", type=non_negative_float, metavar="T", help="step cache threshold (default off)")
    p.add_argument("--compile", action="store_true", help="compile each denoising step as one graph (CUDA graph on GPU)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="offload mode (default none)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=non_negative_float, default=4.5, help="CFG scale (default 4.5)")
    p.add_argument("--prompt", default="a ball bouncing on a wooden floor", help="text prompt")
    p.add_argument("--seed", type=non_negative_int, default=0, help="noise seed (default 0)")
    p.add_argument("--repeat", type=positive_int, default=3, help="counted runs; the table shows medians (default 3)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="uncounted runs first (default 1)")
    p.add_argument("--output", choices=("mp4", "wav", "none"), default="mp4", help="what the write stage writes (default mp4)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write all numbers and machine details as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(run=run)


def spec_summary(spec: EngineSpec) -> str:
    return f"precision={spec.precision}, step_cache={spec.step_cache}, compile={spec.compile}, offload={spec.offload}"


def spec_from_args(args: argparse.Namespace) -> EngineSpec:
    if getattr(args, "model_dir", None) is not None:
        return EngineSpec("model-dir", model=args.model, model_dir=args.model_dir, precision=args.precision,
                          step_cache=args.step_cache, compile=args.compile, offload=args.offload, device=args.device,
                          siglip_dir=args.siglip_dir, clap_dir=args.clap_dir)
    if args.random_weights:
        return EngineSpec("random", model=args.random_weights, precision=args.precision, step_cache=args.step_cache,
                          compile=args.compile, offload=args.offload, device=args.device, seed=args.seed)
    return EngineSpec("demo", precision=args.precision, step_cache=args.step_cache, compile=args.compile,
                      offload=args.offload, device=args.device)


def run(args: argparse.Namespace) -> int:
    UsageError = _usage_error()
    video = check_video(args.video)
    check_output_file(args.json, "--json")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise UsageError(f"model folder {args.model_dir} does not exist; pass the folder that holds the official weights")

    def log(line: str) -> None:
        print(f"foleyserve profile: {line}", file=sys.stderr, flush=True)

    spec = spec_from_args(args)
    if spec.source == "demo" or spec.model == "tiny":
        log("demo model (random weights, tiny widths): times show the pipeline's fixed costs, not the real model's")
    engine, notes = build_engine(spec, log=log)
    try:
        result = profile_engine(
            engine, video, steps=args.steps, guidance=args.guidance, seed=args.seed, prompt=args.prompt,
            repeat=args.repeat, warmup=args.warmup, max_seconds=args.seconds, output=args.output, log=log,
        )
    except _load_errors() as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        # Options fail late too (torch.compile compiles at the first call; a missing kernel).
        raise UsageError(f"the run failed with {spec_summary(spec)}: {_first_line(e)}") from None
    result.notes = notes + result.notes
    print(format_table(result))
    if args.json is not None:
        write_json(args.json, result.as_json())
        print(f"wrote {args.json}")
    return 0
