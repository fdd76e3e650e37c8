"""``foleyserve export``: ONNX graphs of the pipeline's stages, a manifest, INT8 and TensorRT engines.

    foleyserve export --model-dir DIR --out EXPORT_DIR [--model xl] [--stages dit,dac] [--int8]
    foleyserve export --demo --out EXPORT_DIR
    foleyserve export --out EXPORT_DIR --tensorrt [--buckets 4,8,10,15] [--tensorrt-precision fp16]

Then run with ``--backend onnxruntime --export-dir EXPORT_DIR`` (generate, batch, serve, profiles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="export the stages to ONNX (and INT8 / TensorRT) for --backend onnxruntime|tensorrt",
        description=(
            "Write one ONNX graph per stage (SigLIP2, Synchformer, CLAP text, the DiT step as three graphs, the DAC "
            "decoder) with dynamic lengths into OUT, with manifest.json (inputs, outputs, dynamic axes, opset, source "
            "checkpoint hashes, parity vs torch measured at export). --int8 quantises the transformer stages for CPUs; "
            "--tensorrt builds TensorRT engines from an existing export (CUDA GPU and the tensorrt package needed)."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="folder with the official HunyuanVideo-Foley files")
    src.add_argument("--demo", action="store_true", help="the tiny random-weight demo model")
    p.add_argument("--model", choices=("xxl", "xl"), default="xxl", help="which denoiser of the model folder (default xxl)")
    p.add_argument("--siglip-dir", type=Path, help="local google/siglip2-base-patch16-512 folder (default: search)")
    p.add_argument("--clap-dir", type=Path, help="local laion/larger_clap_general folder (default: search)")
    p.add_argument("--out", type=Path, required=True, help="the export folder to write (created if missing)")
    p.add_argument("--stages", default="all", help="comma-separated: siglip, synchformer, clap, dit, dac (default all)")
    p.add_argument("--int8", action="store_true", help="quantise to INT8 after exporting (CPU edge tier): siglip and clap, where it measured faster and close")
    p.add_argument("--int8-stages", help="which exported stages --int8 quantises (default siglip,clap; synchformer and dit are possible, see BENCHMARKS.md)")
    p.add_argument("--tensorrt", action="store_true", help="build TensorRT engines from the graphs in OUT (needs a CUDA GPU)")
    p.add_argument("--buckets", default=None, help="clip lengths in seconds the TensorRT profiles cover (default: the server's buckets)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch (before CFG doubling) the TensorRT profiles cover (default 4)")
    p.add_argument("--tensorrt-precision", choices=("fp32", "fp16", "bf16", "fp8"), default="bf16",
                   help="TensorRT builder precision (default bf16; fp8 needs an fp8 GPU such as H100/H200)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace):
    """Every argument checked before any model loads; returns the parsed stage lists."""
    from foleyserve.cli import UsageError
    from foleyserve.export.quantize import INT8_DEFAULT_STAGES
    from foleyserve.export.stages import parse_stages

    try:
        stages = parse_stages(args.stages)
        int8 = parse_stages(args.int8_stages) if args.int8_stages else [s for s in INT8_DEFAULT_STAGES if s in stages]
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.int8_stages and not args.int8:
        raise UsageError("--int8-stages needs --int8")
    exporting = args.model_dir is not None or args.demo
    if not exporting and not args.tensorrt:
        raise UsageError("nothing to do: pass --model-dir DIR or --demo to export, and/or --tensorrt to build engines from OUT")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    parent = args.out if args.out.exists() else args.out.parent
    if not parent.exists():
        raise UsageError(f"cannot create {args.out}: {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write into {parent}: permission denied")
    if args.model_dir is not None:
        from foleyserve.pipeline.model_dir import ModelFolderError, check_model_folder

        try:
            check_model_folder(args.model_dir, model=args.model, siglip_dir=args.siglip_dir, clap_dir=args.clap_dir)
        except ModelFolderError as err:
            raise UsageError(str(err)) from None
    if args.max_batch < 1:
        raise UsageError("--max-batch must be at least 1")
    buckets = None
    if args.buckets:
        try:
            buckets = [float(b) for b in args.buckets.split(",") if b.strip()]
        except ValueError:
            raise UsageError(f"--buckets {args.buckets!r}: give clip lengths in seconds, e.g. 4,8,10,15") from None
        if not buckets or any(not 0.64 <= b <= 15.04 for b in buckets):
            raise UsageError("--buckets: each length must be between 0.64 and 15.04 seconds")
    if args.tensorrt:
        from foleyserve.export.tensorrt_build import tensorrt_unavailable

        why = tensorrt_unavailable()
        if why:
            raise UsageError(why)
        if not exporting and not (args.out / "manifest.json").is_file():
            raise UsageError(f"{args.out} holds no export to build engines from: add --model-dir DIR or --demo")
    return stages, int8, buckets


def run(args: argparse.Namespace) -> int:
    from foleyserve.cli import UsageError

    stages, int8, buckets = _check(args)
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "done":
            print(f"export: {stage} ({done + 1}/{total}) ...", file=sys.stderr, flush=True)

    manifest = None
    if args.demo or args.model_dir is not None:
        from foleyserve.export.exporter import export_demo, export_model_dir

        if args.demo:
            manifest = export_demo(args.out, stages=stages, progress=progress)
        else:
            manifest = export_model_dir(args.model_dir, args.out, model=args.model, siglip_dir=args.siglip_dir,
                                        clap_dir=args.clap_dir, stages=stages, progress=progress)
    if args.int8:
        from foleyserve.export.quantize import quantize_stages

        print(f"export: quantising {', '.join(int8)} to INT8 ...", file=sys.stderr, flush=True)
        try:
            manifest = quantize_stages(args.out, int8)
        except ValueError as err:
            raise UsageError(str(err)) from None
    engines = None
    if args.tensorrt:
        from foleyserve.export.tensorrt_build import build_engines

        engines = build_engines(args.out, buckets=buckets, max_batch=args.max_batch, precision=args.tensorrt_precision)
    if manifest is None:
        from foleyserve.export.manifest import read_manifest

        manifest = read_manifest(args.out)
    summary = {
        "out": str(args.out), "seconds": round(time.perf_counter() - t0, 1),
        "graphs": {name: {"file": e.file, "precision": e.extra.get("precision", "fp32"),
                          "parity_rel_l2_max": max(e.parity.values()) if e.parity else None}
                   for name, e in manifest.stages.items()},
    }
    if engines is not None:
        summary["tensorrt"] = engines
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, g in summary["graphs"].items():
            parity = f"{g['parity_rel_l2_max']:.1e}" if g["parity_rel_l2_max"] is not None else "-"
            print(f"{name:18s} {g['precision']:5s} parity (rel-L2 vs torch fp32, at export) {parity}  {g['file']}")
        print(f"wrote {args.out} in {summary['seconds']} s; run with --backend onnxruntime --export-dir {args.out}")
    return 0
