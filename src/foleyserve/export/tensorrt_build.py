"""TensorRT engines from an export folder's ONNX graphs, with optimisation profiles from length buckets.

Shapes: each graph's dynamic axes are named in its manifest (``batch``, ``audio_len``,
``visual_len``, ``sync_len``, ``text_len``, ``latent_len``, ``frames``, ``segments``, ``tokens``).
:func:`dim_ranges` turns the server's clip-length buckets into (min, opt, max) values of those
axes, one optimisation profile per group of buckets, so a 4 s request does not run on kernels
tuned for 15 s; :func:`input_profiles` applies them to a graph's inputs.

Engines are cached under ``EXPORT_DIR/tensorrt/<gpu>-trt<version>-<precision>-<profiles hash>/``:
an engine is only valid for the GPU model and TensorRT version that built it, and a new bucket
set is a new profile. The builder's timing cache is kept beside them, so a rebuild after a bucket
change re-times only new tactics.

Building needs a CUDA GPU and the ``tensorrt`` package; :func:`tensorrt_unavailable` says which is
missing. Everything above the builder (profiles, cache keys) is plain Python and tested anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from foleyserve.export.manifest import StageEntry, read_manifest
from foleyserve.pipeline.lengths import clip_lengths

# The server's "second" length bucket makes every clip a whole number of seconds, 1..15.
DEFAULT_BUCKETS = tuple(float(s) for s in range(1, 16))
TEXT_TOKENS = 77  # the DiT's text features are CLAP's first 77 tokens
CLAP_TOKENS = 512  # CLAP's own limit, <s> and </s> included
SIGLIP_CHUNK = 16  # the engine's chunk sizes (Engine.siglip_chunk / sync_chunk)
SYNC_CHUNK = 8
MAX_PROFILES = 3
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built or run here, or None when they can."""
    import torch

    if not torch.cuda.is_available():
        return ("TensorRT needs a CUDA GPU and this machine has none; build the engines on the GPU machine that will "
                "run them (foleyserve export --out EXPORT_DIR --tensorrt), or use --backend onnxruntime on a CPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed: pip install tensorrt (matching the CUDA version), then run this again"
    return None


def bucket_groups(buckets: Sequence[float], groups: int = MAX_PROFILES) -> list[list[float]]:
    """Sorted buckets cut into at most ``groups`` runs of similar length (one profile each)."""
    b = sorted({float(x) for x in buckets})
    if not b:
        raise ValueError("no buckets")
    n = min(groups, len(b))
    size, extra = divmod(len(b), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(b[start:end])
        start = end
    return out


def dim_ranges(buckets: Sequence[float] = DEFAULT_BUCKETS, *, max_batch: int = 4) -> list[dict[str, tuple[int, int, int]]]:
    """Per optimisation profile: axis name -> (min, opt, max).

    Each profile spans a group of buckets from its shortest clip to its longest, tuned (opt) for
    the longest, the costliest shape it serves. Batches run from 1 to ``2 * max_batch`` rows (CFG
    doubles them), tuned for one request's CFG pair.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    profiles = []
    for group in bucket_groups(buckets):
        lo, hi = clip_lengths(group[0]), clip_lengths(group[-1])
        batch = (1, 2, 2 * max_batch)
        profiles.append({
            "batch": batch,
            "audio_len": (lo["audio_len"], hi["audio_len"], hi["audio_len"]),
            "latent_len": (lo["audio_len"], hi["audio_len"], hi["audio_len"]),
            "visual_len": (lo["visual_len"], hi["visual_len"], hi["visual_len"]),
            "sync_len": (lo["sync_len"], hi["sync_len"], hi["sync_len"]),
            "text_len": (1, TEXT_TOKENS, TEXT_TOKENS),
            "frames": (1, SIGLIP_CHUNK, SIGLIP_CHUNK),
            "segments": (1, SYNC_CHUNK, SYNC_CHUNK),
            "tokens": (2, TEXT_TOKENS, CLAP_TOKENS),
        })
    return profiles


def input_profiles(entry: StageEntry, ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``input name -> (min shape, opt shape, max shape)`` of one graph under one profile.

    Raises ValueError for a dynamic axis the ranges do not cover (a graph newer than this code).
    The DAC graph's batch is one request's rows (no CFG), so its batch stays at ``max / 2``.
    """
    out = {}
    for spec in entry.inputs:
        shapes: list[list[int]] = [[], [], []]
        for axis in spec.shape:
            if isinstance(axis, int):
                for s in shapes:
                    s.append(axis)
                continue
            if axis not in ranges:
                raise ValueError(f"{entry.stage}: input {spec.name} has dynamic axis {axis!r} with no range")
            lo, opt, hi = ranges[axis]
            if entry.stage == "dac_decoder" and axis == "batch":
                lo, opt, hi = 1, 1, max(1, hi // 2)
            if entry.stage == "clap_text" and axis == "batch":
                lo, opt, hi = 2, 2, 2  # the prompt pair, tokenized together
            for s, v in zip(shapes, (lo, opt, hi)):
                s.append(v)
        out[spec.name] = tuple(tuple(s) for s in shapes)
    return out


def profiles_key(ranges: list[dict[str, tuple[int, int, int]]], precision: str) -> str:
    blob = json.dumps({"ranges": ranges, "precision": precision}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def engine_dir(export_dir: str | Path, *, gpu: str, trt_version: str, precision: str, key: str) -> Path:
    """Where engines for this GPU model, TensorRT version, precision and profile set live."""
    slug = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower()
    return Path(export_dir) / "tensorrt" / f"{slug}-trt{trt_version}-{precision}-{key}"


def build_engines(
    export_dir: str | Path,
    *,
    buckets: Sequence[float] | None = None,
    max_batch: int = 4,
    precision: str = "bf16",
    stages: Sequence[str] | None = None,
    workspace_gb: float = 8.0,
) -> dict[str, Any]:
    """Build (or reuse) a TensorRT engine per graph of ``export_dir``; returns what was built and how long it took.

    ``precision`` enables the builder's reduced-precision kernels (fp16/bf16; fp8 also needs an
    fp8-capable GPU, and TensorRT keeps layers in higher precision where the graph's
    normalisations need it). Engines already in the cache for this GPU, version and profile set
    are reused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    why = tensorrt_unavailable()
    if why:
        raise RuntimeError(why)
    import tensorrt as trt
    import torch

    manifest = read_manifest(export_dir)
    ranges = dim_ranges(buckets or DEFAULT_BUCKETS, max_batch=max_batch)
    gpu = torch.cuda.get_device_name()
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError(f"fp8 needs an Ada/Hopper or newer GPU; {gpu} is not one: use bf16 or fp16")
    out_dir = engine_dir(export_dir, gpu=gpu, trt_version=trt.__version__, precision=precision, key=profiles_key(ranges, precision))
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    timing_path = Path(export_dir) / "tensorrt" / "timing.cache"
    report: dict[str, Any] = {"engine_dir": str(out_dir), "gpu": gpu, "tensorrt": trt.__version__, "precision": precision,
                              "profiles": ranges, "engines": {}}
    names = [n for n in manifest.stages if stages is None or n in stages]
    for name in names:
        entry = manifest.stages[name]
        plan = out_dir / f"{name}.plan"
        if plan.is_file():
            report["engines"][name] = {"file": plan.name, "cached": True}
            continue
        t0 = time.perf_counter()
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(Path(export_dir) / entry.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {entry.file}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        flag = {"fp16": "FP16", "bf16": "BF16", "fp8": "FP8"}.get(precision)
        if flag:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        for r in ranges:
            profile = builder.create_optimization_profile()
            for input_name, (lo, opt, hi) in input_profiles(entry, r).items():
                profile.set_shape(input_name, lo, opt, hi)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {entry.file} (see the log above)")
        tmp = plan.with_suffix(".plan.tmp")
        tmp.write_bytes(bytes(serialized))
        tmp.replace(plan)
        timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        report["engines"][name] = {"file": plan.name, "cached": False, "build_seconds": round(time.perf_counter() - t0, 1),
                                   "bytes": plan.stat().st_size}
    (out_dir / "build.json").write_text(json.dumps(report, indent=2))
    return report


def find_engine_dir(export_dir: str | Path, precision: str | None = None) -> Path | None:
    """The newest engine folder built for this GPU and TensorRT version, or None."""
    import tensorrt as trt
    import torch

    gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name()).strip("-").lower()
    root = Path(export_dir) / "tensorrt"
    prefix = f"{gpu}-trt{trt.__version__}-" + (f"{precision}-" if precision else "")
    found = sorted((p for p in root.glob(f"{prefix}*") if (p / "build.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


__all__ = ["DEFAULT_BUCKETS", "bucket_groups", "build_engines", "dim_ranges", "engine_dir", "find_engine_dir",
           "input_profiles", "profiles_key", "tensorrt_unavailable"]
