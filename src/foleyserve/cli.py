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
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest, GenerationResult

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------ generate

_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
_OUTPUT_SUFFIXES = (".wav", ".flac", ".mp4")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="folder with the official HunyuanVideo-Foley files")
    src.add_argument("--demo", action="store_true", help="tiny random-weight model (output is noise; no download)")
    p.add_argument("--model", choices=("xxl", "xl"), default="xxl", help="which denoiser of the model folder (default xxl)")
    p.add_argument(
        "--precision", default=None,
        help=f"denoiser precision policy: {', '.join(_PRECISIONS)} (default bf16; for --demo bf16 where the "
        "CPU or GPU has bf16 matrix units, else fp32)",
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
    p.add_argument("--encoder-precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="SigLIP2, Synchformer and CLAP under autocast of this dtype (default auto: the official handling)")
    p.add_argument("--student", type=Path, metavar="PATH",
                   help="turbo tier: a distilled student denoiser (`foleyserve distill train`); samples with its own step count, no CFG")
    p.add_argument("--light-decoder", type=Path, metavar="PATH", help="turbo tier: a light DAC decoder (`foleyserve distill train --target decoder`)")
    p.add_argument(
        "--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
        help="run exported stages on ONNX Runtime (CPU/CUDA) or on TensorRT engines built by `foleyserve export --tensorrt` (needs --export-dir; default torch)",
    )
    p.add_argument("--export-dir", type=Path, help="the folder `foleyserve export` wrote (for --backend)")
    p.add_argument("--backend-stages", metavar="STAGES",
                   help="comma-separated stages the backend runs: siglip, synchformer, clap, dit, dac (default: all exported)")


def _add_sampling_args(p: argparse.ArgumentParser, *, steps: int = 50, prompt: str = "") -> None:
    from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

    said = f" (default {prompt!r})" if prompt else ""
    p.add_argument("--prompt", default=prompt, help=f"what the scene should sound like{said}")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f"what to avoid (default {DEFAULT_NEGATIVE_PROMPT!r})")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same audio on any device")


def parse_loudness(text: str) -> float | None:
    """``--loudness`` value: a target in LUFS, or ``off`` (None: write the raw model output)."""
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a loudness: give LUFS like -23 or -14, or 'off'") from None


def add_level_args(p: argparse.ArgumentParser) -> None:
    """``--loudness`` and ``--bit-depth`` (generate, demo, batch)."""
    from foleyserve.loudness import DEFAULT_TARGET_LUFS, DEFAULT_TRUE_PEAK_DBTP

    p.add_argument(
        "--loudness", type=parse_loudness, default=DEFAULT_TARGET_LUFS, metavar="LUFS|off",
        help=f"integrated loudness of the output (default {DEFAULT_TARGET_LUFS:g}, EBU R128; -14 or -16 for web), "
             f"true peak under {DEFAULT_TRUE_PEAK_DBTP:g} dBTP; 'off' writes the raw model output",
    )
    p.add_argument("--bit-depth", type=int, choices=(16, 24), help="PCM bits of a .wav/.flac output (default: 32-bit float WAV, 24-bit FLAC)")


def check_level_args(args: argparse.Namespace, fmt: str) -> None:
    """Refuse ``--loudness``/``--bit-depth`` values that cannot apply to output format ``fmt``."""
    from foleyserve.loudness import check_target

    if args.loudness is not None:
        try:
            check_target(args.loudness)
        except ValueError as e:
            raise UsageError(f"--{e}") from None
    if args.bit_depth is not None and fmt not in ("wav", "flac"):
        raise UsageError(f"--bit-depth applies to wav and flac output, not {fmt} (its audio is AAC)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate Foley audio for a video",
        description=(
            "Generate 48 kHz Foley for VIDEO and write it as .wav, .flac or an .mp4 with the new sound. "
            "Every flag and the input are checked before the model loads. For a CSV of jobs use `foleyserve batch`."
        ),
    )
    p.add_argument("video", metavar="VIDEO", nargs="?", type=Path, help="input video file")
    p.add_argument("--out", type=Path, help="output file: .wav, .flac or .mp4 (default: VIDEO_foley.mp4 beside the input)")
    p.add_argument("--keep-original-audio", type=float, metavar="GAIN", help="mix the video's own sound under the Foley at this gain (mp4)")
    p.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="score the video from this time on (default 0)")
    p.add_argument(
        "--duration", type=float, metavar="SECONDS",
        help="score this many seconds of the video (default: to its end; over 15 s runs in overlapping windows; "
        "--duration 15 is the official single clip, 15.04 s); without a VIDEO: text to audio of this length",
    )
    # `generate --csv` moved to `batch`; the old flags stay (hidden) to answer with where it went.
    p.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    add_level_args(p)
    _add_sampling_args(p)
    _add_engine_args(p)
    from foleyserve.commands.generate_options import add_generate_options

    add_generate_options(p)  # --auto, text to audio, variations
    p.set_defaults(run=_run_generate)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from foleyserve.config import DEMO_PROMPT, DEMO_STEPS

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample clip with the demo model",
        description=(
            "Generate for the bundled sample clip with the tiny random-weight demo model (its output is noise, "
            "at about -23 dBFS). It runs in bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16), else fp32."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("out/sample_foley.mp4"), help="output file (default out/sample_foley.mp4)")
    p.add_argument("--video", type=Path, help="use this video instead of the bundled sample")
    p.add_argument("--precision", default=None, help=f"override the demo's precision: {', '.join(_PRECISIONS)}")
    add_level_args(p)
    _add_sampling_args(p, steps=DEMO_STEPS, prompt=DEMO_PROMPT)
    p.set_defaults(run=_run_demo)


def engine_config_from_args(args: argparse.Namespace) -> "EngineConfig":
    """The validated :class:`EngineConfig` that the engine flags describe (generate, batch, serve).

    Raises :class:`UsageError` for an unknown precision, device, offload mode or a combination
    that cannot run; nothing is loaded.
    """
    from foleyserve.config import ConfigError, EngineConfig

    demo = bool(getattr(args, "demo", False))
    backend = getattr(args, "backend", "torch")
    # Exported graphs carry their own precision; the torch parts left around them run fp32.
    default_precision = "fp32" if backend != "torch" else (demo_precision_for(args.device)[0] if demo else "bf16")
    precision = args.precision or default_precision
    if getattr(args, "model_dir", None) is None and not demo:
        raise UsageError("no model given: pass --model-dir DIR (the official weights) or --demo")
    keep = getattr(args, "keep_fp32", None)
    config = EngineConfig(
        model_dir=getattr(args, "model_dir", None),
        demo=demo,
        model=getattr(args, "model", "xxl"),
        precision=precision,
        device=args.device,
        keep_fp32=[k.strip() for k in keep.split(",") if k.strip()] if keep is not None else None,
        step_cache=getattr(args, "step_cache", None),
        compile=bool(getattr(args, "compile", False)),
        offload=getattr(args, "offload", "none"),
        siglip_dir=getattr(args, "siglip_dir", None),
        clap_dir=getattr(args, "clap_dir", None),
        backend=backend,
        export_dir=getattr(args, "export_dir", None),
        backend_stages=_stage_list(getattr(args, "backend_stages", None)),
        encoder_precision=getattr(args, "encoder_precision", "auto"),
        student=getattr(args, "student", None),
        light_decoder=getattr(args, "light_decoder", None),
    )
    if config.student is not None or config.light_decoder is not None:
        from foleyserve.distill.turbo import check_turbo_files

        try:
            check_turbo_files(config.student, config.light_decoder)  # headers only: a bad file fails before loading
        except ValueError as err:
            raise UsageError(str(err)) from None
    try:
        return config.validate()
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _stage_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from foleyserve.export.stages import parse_stages

    try:
        return parse_stages(text)
    except ValueError as err:
        raise UsageError(f"--backend-stages: {err}") from None


def demo_precision_for(device: str) -> tuple[str, str]:
    """(precision, reason) for the demo model on ``device``; see :func:`foleyserve.pipeline.demo.demo_precision`."""
    from foleyserve.pipeline.demo import demo_precision

    try:
        return demo_precision(device)
    except RuntimeError:  # a malformed device string: validate() names the choices
        return "fp32", "unknown device"


def check_before_loading(config: "EngineConfig", requests: "Sequence[GenerationRequest]") -> None:
    """Everything about a run that can be checked without loading a model, cheapest first.

    The device (is the GPU there?), the model folder (every file present), each request's fields,
    its prompts' token counts (with the tokenizer alone) and its video (probe and decode budget).
    Raises :class:`UsageError` with the first problem.
    """
    from foleyserve.pipeline.model_dir import check_model_folder
    from foleyserve.pipeline.devices import resolve_device
    from foleyserve.preflight import PromptChecker, check_video

    try:
        resolve_device(config.device)
        if not config.demo:
            check_model_folder(config.model_dir, model=config.model, siglip_dir=config.siglip_dir, clap_dir=config.clap_dir)  # type: ignore[arg-type]
        if config.backend != "torch":
            if missing_modules(["onnxruntime"]):
                raise UsageError(f"--backend {config.backend} needs onnxruntime: {EXPORT_EXTRA}")
            from foleyserve.export.backend import check_export

            check_export(config)
        for request in requests:
            request.validate()
        checker = PromptChecker(demo=config.demo, model_dir=config.model_dir, clap_dir=config.clap_dir)
        for request in requests:
            checker.check(request.prompt, request.negative_prompt)
            if isinstance(request.video, (str, Path)):
                check_video(request.video)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None


def load_engine(config: "EngineConfig") -> "Engine":
    """Build the engine for a checked config, saying on stderr when it is the demo model."""
    from foleyserve.pipeline.pipeline import Engine

    if config.demo:
        chosen, why = demo_precision_for(config.device)
        reason = why if config.precision == chosen else "asked for"
        print(f"foleyserve: using the DEMO model (random weights, the audio is noise); precision: {config.precision} ({reason})", file=sys.stderr)
    try:
        return Engine.from_config(config)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None


def _engine_from_args(args: argparse.Namespace) -> "Engine":
    return load_engine(engine_config_from_args(args))


def check_input_file(path: Path, what: str = "video") -> None:
    """A readable file at ``path``, or a :class:`UsageError` that says what is wrong with it."""
    import os

    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file; pass the path of a {what} file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} is not readable; check its permissions")


def _check_writable(path: Path) -> None:
    import os

    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot write {path}: {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: folder {parent} is not writable; choose another --out")
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name ending in .wav, .flac or .mp4")


def _check_output(out: Path) -> None:
    if out.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise UsageError(f"output {out} must end in .wav, .flac or .mp4")
    _check_writable(out)


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
    from foleyserve.config import ConfigError
    from foleyserve.media import MediaError
    from foleyserve.models.encoders import PromptTooLongError
    from foleyserve.models.loading import CheckpointError
    from foleyserve.export.stages import BackendError
    from foleyserve.pipeline.model_dir import ModelFolderError
    from foleyserve.pipeline.requests import RequestError

    return (MediaError, RequestError, ModelFolderError, CheckpointError, PromptTooLongError, ConfigError, BackendError)


def _request(args: argparse.Namespace, video: Path, out: Path, gain: float | None = None) -> "GenerationRequest":
    from foleyserve.pipeline.requests import GenerationRequest

    return GenerationRequest(
        video=video, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance, seed=args.seed, output=out, keep_original_audio_gain=gain,
        start=getattr(args, "start", 0.0), duration=getattr(args, "duration", None),
        loudness=args.loudness, bit_depth=args.bit_depth,
    )


def _validate(request: "GenerationRequest") -> None:
    from foleyserve.pipeline.requests import RequestError

    try:
        request.validate()
    except RequestError as err:
        raise UsageError(str(err)) from None


def _run_one(engine: "Engine", request: "GenerationRequest") -> "GenerationResult":
    progress = _Progress()
    try:
        return engine.generate(request, progress=progress)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    finally:
        progress.close()


def _run_generate(args: argparse.Namespace) -> int:
    if args.csv is not None:
        raise UsageError(
            f"`generate --csv` is now `foleyserve batch {args.csv} --out-dir DIR` (the same columns, plus an optional "
            f"'id'; resumable); see `foleyserve batch --help`"
        )
    from foleyserve.commands import generate_options as extra

    extra.resolve_generate_args(args)  # --auto's choices (printed) where no flag was given; VIDEO or --duration
    if args.video is not None:
        check_input_file(args.video)
    out = extra.default_output(args)
    _check_output(out)
    request = extra.complete_request(_request(args, args.video, out, gain=args.keep_original_audio), args)
    _validate(request)  # first: it needs no model code imported, so a bad flag fails fastest
    extra.check_request(request, args)
    config = engine_config_from_args(args)
    check_before_loading(config, [request])
    for result in extra.run_requested(load_engine(config), request, args, _run_one):  # several with --num-samples
        print(_summary(result))
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.demo import sample_clip_path

    video = args.video or sample_clip_path()
    check_input_file(video)
    _check_output(args.out)
    precision = args.precision or demo_precision_for("cpu")[0]
    config = EngineConfig(demo=True, precision=precision, device="cpu")
    try:
        config = config.validate()
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    request = _request(args, video, args.out)
    _validate(request)
    check_before_loading(config, [request])
    print("foleyserve demo: tiny random-weight model, the audio is NOISE; use `generate --model-dir` for real Foley", file=sys.stderr)
    result = _run_one(load_engine(config), request)
    print(_summary(result))
    return EXIT_OK


# ---------------------------------------------------------------------------------------- main

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate, _add_demo]
# Larger commands live in foleyserve/commands/<name>.py, each with add_parser(sub) that sets
# ``run`` (a function of the parsed args returning an exit code; it may raise UsageError).
_COMMAND_MODULES = ("convert", "serve", "batch", "profile", "fidelity", "score", "export", "distill")


# What each command needs beyond the core dependencies, and the extra that installs it.
SERVE_EXTRA = "pip install 'foleyserve[serve]'"
EXPORT_EXTRA = "pip install 'foleyserve[export]'"
_EXTRA_MODULES = {"serve": ("fastapi", "uvicorn", "python_multipart", "diskcache", "redis", "prometheus_client"),
                  "export": ("onnx", "onnxruntime", "onnxscript")}


def missing_modules(names: Sequence[str]) -> list[str]:
    """Which of these top-level modules cannot be imported here."""
    import importlib

    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


_EXTRA_INSTALL = {"serve": SERVE_EXTRA, "export": EXPORT_EXTRA}


def _require_extra(command: str) -> None:
    missing = missing_modules(_EXTRA_MODULES.get(command, ()))
    if missing:
        extra = "export" if command == "export" else "serve"
        raise UsageError(
            f"`foleyserve {command}` needs the {extra} extra, which is not installed (missing: {', '.join(missing)}); "
            f"run: {_EXTRA_INSTALL[extra]}"
        )


def _add_command_modules(sub: argparse._SubParsersAction) -> None:
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(f"foleyserve.commands.{name}") is None:
            continue
        try:
            module = importlib.import_module(f"foleyserve.commands.{name}")
        except ImportError as err:
            # A command whose optional dependencies are absent still shows up, and says what to install.
            p = sub.add_parser(name, help=f"(needs {SERVE_EXTRA})", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(run=_unavailable(name, err))
            continue
        module.add_parser(sub)


def _unavailable(name: str, err: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        raise UsageError(f"`foleyserve {name}` cannot start here ({err}); run: {SERVE_EXTRA}")

    return run


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
        _require_extra(args.command)
        return args.run(args)
    except UsageError as err:
        print(f"foleyserve {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"foleyserve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
