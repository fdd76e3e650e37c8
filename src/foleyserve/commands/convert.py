"""`foleyserve convert`: an official .pth checkpoint rewritten as .safetensors (memory-mapped loads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from foleyserve.cli import EXIT_OK, UsageError

_DTYPES = {"keep": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite an official .pth checkpoint as .safetensors",
        description=(
            "Rewrite an official .pth checkpoint (plain state dict, or the DAC "
            "{'state_dict', 'metadata'} layout whose constructor kwargs are kept as JSON under "
            "'config' in the safetensors metadata) as a .safetensors file that loads memory-mapped."
        ),
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="checkpoint to read (.pth, .pt, .bin)")
    p.add_argument("output", metavar="OUTPUT", type=Path, help="file to write (.safetensors)")
    p.add_argument(
        "--dtype", choices=list(_DTYPES), default="keep",
        help="cast floating-point tensors (default: keep the stored dtypes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--trust-pickle", action="store_true",
        help="allow a pickle that the safe loader refuses; this runs code from INPUT, so only "
        "use it for files from a source you trust",
    )
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import torch

    from foleyserve.models.loading import CheckpointError, convert_to_safetensors

    src: Path = args.input
    dst: Path = args.output
    if not src.exists():
        raise UsageError(f"input {src} does not exist; pass the path of a .pth checkpoint")
    if src.is_dir():
        raise UsageError(f"input {src} is a directory; pass the path of a .pth checkpoint file")
    if dst.suffix.lower() != ".safetensors":
        raise UsageError(f"output {dst} must end in .safetensors (arguments are INPUT then OUTPUT)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError("input and output are the same file; choose another output path")
    if dst.is_dir():
        raise UsageError(f"output {dst} is a directory; give a file name ending in .safetensors")
    if dst.exists() and not args.overwrite:
        raise UsageError(f"output {dst} already exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise UsageError(f"cannot write {dst}: folder {dst.parent} does not exist; create it first")

    dtype = getattr(torch, _DTYPES[args.dtype]) if _DTYPES[args.dtype] else None
    try:
        summary = convert_to_safetensors(src, dst, dtype=dtype, trust_pickle=args.trust_pickle)
    except CheckpointError as err:
        raise UsageError(f"{err}") from None
    except OSError as err:
        # Read errors on INPUT surface as CheckpointError or were caught above, so an OSError here
        # is almost always about OUTPUT (permissions, full disk).
        reason = err.strerror or str(err)
        raise UsageError(f"cannot write {dst}: {reason}; choose a writable location with enough space") from None
    dtypes = ", ".join(f"{n} {name}" for name, n in sorted(summary.dtypes.items()))
    config = "; constructor config kept in metadata" if summary.has_config else ""
    print(f"wrote {dst}: {summary.tensors} tensors ({dtypes}), {summary.bytes_written / 1e9:.3f} GB{config}")
    return EXIT_OK
