"""Command line entry point: ``foleyserve <command> ...`` (also ``python -m foleyserve``).

Each command is a pair of functions: ``_add_<name>`` declares its arguments and ``_run_<name>``
does the work and returns an exit code. Problems the user can fix (bad paths, wrong files) are
raised as :class:`UsageError` and printed as one line on stderr with exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------- convert

_DTYPES = {"keep": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _add_convert(sub: argparse._SubParsersAction) -> None:
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


# ------------------------------------------------------------------------------------ generate

_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
_CSV_FORMATS = ("mp4", "wav", "flac")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="folder with the official HunyuanVideo-Foley files")
    src.add_argument("--demo", action="store_true", help="tiny random-weight model (output is noise; no download)")
    p.add_argument("--model", choices=("xxl", "xl"), default="xxl", help="which denoiser of the model folder (default xxl)")
    p.add_argument(
        "--precision", default=None,
        help=f"denoiser precision policy: {', '.join(_PRECISIONS)} (default bf16; fp32 for --demo)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--siglip-dir", type=Path, help="local google/siglip2-base-patch16-512 folder (default: search)")
    p.add_argument("--clap-dir", type=Path, help="local laion/larger_clap_general folder (default: search)")
    p.add_argument(
        "--step-cache", type=float, metavar="T",
        help="reuse the denoiser's residual on steps that change less than T (e.g. 0.05; default off = exact)",
    )
    p.add_argument("--compile", action="store_true", help="compile each denoising step as one graph (CUDA graph on GPU); the first request of each clip length compiles")
    p.add_argument(
        "--offload", choices=("none", "stage", "sequential"), default="none",
        help="keep models in host RAM and lend the running stage to the GPU (stage), also streaming DiT blocks (sequential)",
    )
    p.add_argument("--keep-fp32", metavar="PATTERNS", help="comma-separated layer patterns kept in fp32 under bf16/fp16/fp8")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

    p.add_argument("--prompt", default="", help="what the scene should sound like")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f"what to avoid (default {DEFAULT_NEGATIVE_PROMPT!r})")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same audio on any device")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate Foley audio for a video (or a CSV of videos)",
        description="Generate 48 kHz Foley for VIDEO and write it as .wav, .flac or an .mp4 with the new sound.",
    )
    p.add_argument("video", metavar="VIDEO", nargs="?", type=Path, help="input video file")
    p.add_argument("--out", type=Path, help="output file: .wav, .flac or .mp4 (default: VIDEO_foley.mp4 beside the input)")
    p.add_argument("--keep-original-audio", type=float, metavar="GAIN", help="mix the video's own sound under the Foley at this gain (mp4)")
    p.add_argument("--csv", type=Path, help="jobs file with columns video,prompt[,negative_prompt,seed]; resumable")
    p.add_argument("--out-dir", type=Path, help="output folder for --csv")
    p.add_argument("--format", choices=_CSV_FORMATS, default="mp4", help="output format for --csv (default mp4)")
    _add_sampling_args(p)
    _add_engine_args(p)
    p.set_defaults(run=_run_generate)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample clip with the demo model",
        description="Generate for the bundled sample clip with the tiny random-weight demo model (its output is noise).",
    )
    p.add_argument("--out", type=Path, default=Path("out/sample_foley.mp4"), help="output file (default out/sample_foley.mp4)")
    p.add_argument("--video", type=Path, help="use this video instead of the bundled sample")
    _add_sampling_args(p)
    p.set_defaults(run=_run_demo, prompt="a ball bouncing on a wooden floor", steps=25)


def engine_config_from_args(args: argparse.Namespace):
    """The :class:`EngineConfig` that the engine flags describe (shared by generate, batch, serve)."""
    from foleyserve.config import ConfigError, EngineConfig

    precision = args.precision or ("fp32" if args.demo else "bf16")
    if precision not in _PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(_PRECISIONS)}")
    if not args.demo and args.model_dir is None:
        raise UsageError("no model given: pass --model-dir DIR (the official weights) or --demo")
    keep = getattr(args, "keep_fp32", None)
    config = EngineConfig(
        model_dir=args.model_dir,
        demo=bool(args.demo),
        model=args.model,
        precision=precision,
        device=args.device,
        keep_fp32=[k.strip() for k in keep.split(",") if k.strip()] if keep is not None else None,
        step_cache=getattr(args, "step_cache", None),
        compile=bool(getattr(args, "compile", False)),
        offload=getattr(args, "offload", "none"),
        siglip_dir=args.siglip_dir,
        clap_dir=args.clap_dir,
    )
    try:
        return config.validate()
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _engine_from_args(args: argparse.Namespace):
    from foleyserve.pipeline.pipeline import Engine

    config = engine_config_from_args(args)
    if config.demo:
        print("foleyserve: using the DEMO model (random weights): the audio will be noise", file=sys.stderr)
    return Engine.from_config(config)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot write {path}: {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    import os

    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: folder {parent} is not writable; choose another --out")
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name ending in .wav, .flac or .mp4")


class _Progress:
    """tqdm bars on stderr for the long stages."""

    def __init__(self) -> None:
        self.bar = None
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        # Track the stage here: a disabled bar (stderr not a terminal) has no ``desc`` attribute.
        if self.bar is None or self.stage != stage:
            self.close()
            self.bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False, disable=None)
            self.stage = stage
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None


def _summary(result) -> str:
    lines = [f"wrote {', '.join(str(f) for f in result.files) or '(nothing)'}: {result.audio_seconds:.2f} s of audio at {result.sample_rate} Hz ({result.model})"]
    for stage, rec in result.memory.items():
        dev = f", device peak {rec['device_peak_bytes'] / 2**30:.2f} GiB" if rec["device_peak_bytes"] is not None else ""
        lines.append(f"  {stage:<12} {rec['seconds']:8.3f} s   host peak {rec['host_peak_bytes'] / 2**30:.2f} GiB{dev}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def _generation_errors() -> tuple[type[BaseException], ...]:
    from foleyserve.media import MediaError
    from foleyserve.models.loading import CheckpointError
    from foleyserve.pipeline.model_dir import ModelFolderError
    from foleyserve.pipeline.requests import RequestError

    return (MediaError, RequestError, ModelFolderError, CheckpointError)


def _run_one(engine, video: Path, out: Path, args: argparse.Namespace, gain: float | None = None):
    from foleyserve.pipeline.requests import GenerationRequest

    req = GenerationRequest(
        video=video, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance, seed=args.seed, output=out, keep_original_audio_gain=gain,
    )
    progress = _Progress()
    try:
        return engine.generate(req, progress=progress)
    finally:
        progress.close()


def _run_generate(args: argparse.Namespace) -> int:
    if args.csv is not None:
        return _run_csv(args)
    if args.video is None:
        raise UsageError("no input: pass a VIDEO file, or --csv jobs.csv --out-dir DIR")
    if not args.video.exists():
        raise UsageError(f"video {args.video} does not exist; check the path")
    out = args.out or args.video.with_name(args.video.stem + "_foley.mp4")
    if out.suffix.lower() not in (".wav", ".flac", ".mp4"):
        raise UsageError(f"output {out} must end in .wav, .flac or .mp4")
    _check_writable(out)
    try:
        engine = _engine_from_args(args)
        result = _run_one(engine, args.video, out, args, gain=args.keep_original_audio)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    print(_summary(result))
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.demo import sample_clip_path

    video = args.video or sample_clip_path()
    if not video.exists():
        raise UsageError(f"video {video} does not exist; check the path")
    _check_writable(args.out)
    print("foleyserve demo: tiny random-weight model, the audio is NOISE; use `generate --model-dir` for real Foley", file=sys.stderr)
    try:
        engine = Engine.demo()
        result = _run_one(engine, video, args.out, args)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    print(_summary(result))
    return EXIT_OK


def _read_jobs(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        raise UsageError(f"jobs file {path} does not exist; check the --csv path")
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "video" not in cols or "prompt" not in cols:
                raise UsageError(f"{path} needs a header with columns video,prompt[,negative_prompt,seed]; found {cols}")
            rows = []
            for row in reader:
                if None in row:  # DictReader files surplus fields under the key None
                    raise UsageError(
                        f"{path} line {reader.line_num} has more fields than the header ({len(cols)}); "
                        f"put a prompt that contains commas in double quotes"
                    )
                rows.append({k.strip(): (v or "").strip() for k, v in row.items()})
            return rows
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text CSV file") from None


def _run_csv(args: argparse.Namespace) -> int:
    import copy

    if args.out_dir is None:
        raise UsageError("--csv needs --out-dir DIR for the results")
    jobs = _read_jobs(args.csv)
    _check_writable(args.out_dir / "probe")
    try:
        engine = _engine_from_args(args)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    base = args.csv.parent
    done = skipped = failed = 0
    for i, job in enumerate(jobs):
        out = args.out_dir / f"{i:04d}.{args.format}"
        if out.exists():  # written atomically below, so an existing file is a finished row
            skipped += 1
            continue
        row = copy.copy(args)
        row.prompt = job.get("prompt", "")
        row.negative_prompt = job.get("negative_prompt") or args.negative_prompt
        try:
            try:
                row.seed = int(job["seed"]) if job.get("seed") else args.seed
            except ValueError:
                raise UsageError(f"seed {job['seed']!r} is not an integer; fix the 'seed' column or leave it empty") from None
            video = Path(job["video"])
            video = video if video.is_absolute() else base / video
            if not video.exists():
                raise UsageError(f"video {video} does not exist; check the path in the 'video' column")
            tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
            _run_one(engine, video, tmp, row)
            tmp.replace(out)
            done += 1
            print(f"row {i}: wrote {out}")
        except (UsageError, ValueError, *_generation_errors()) as err:
            failed += 1
            print(f"row {i}: failed, skipped: {err}", file=sys.stderr)
    print(f"{done} generated, {skipped} already done, {failed} failed, of {len(jobs)} rows")
    return EXIT_OK if failed == 0 else 1


# ---------------------------------------------------------------------------------------- main

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate, _add_demo, _add_convert]
# Larger commands live in foleyserve/commands/<name>.py, each with add_parser(sub) that sets
# ``run`` (a function of the parsed args returning an exit code; it may raise UsageError).
_COMMAND_MODULES = ("serve", "batch", "profile", "fidelity")


def _add_command_modules(sub: argparse._SubParsersAction) -> None:
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(f"foleyserve.commands.{name}") is None:
            continue
        importlib.import_module(f"foleyserve.commands.{name}").add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    from foleyserve import __version__

    parser = argparse.ArgumentParser(
        prog="foleyserve", description="HunyuanVideo-Foley inference engine (video + prompt -> 48 kHz Foley audio)."
    )
    parser.add_argument("--version", action="version", version=f"foleyserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    _add_command_modules(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # The CLI prints a result's warnings itself; keep the library logger from repeating them.
    logging.getLogger("foleyserve").setLevel(logging.ERROR)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse has already printed usage or help; hand its status back instead of exiting
        # so that callers of main() (tests, embedding programs) keep control.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except UsageError as err:
        print(f"foleyserve {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"foleyserve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
