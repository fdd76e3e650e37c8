"""`foleyserve generate` beyond one video -> one file: ``--auto`` (settings for the machine), text
to audio (no VIDEO, ``--duration``), variations (``--num-samples`` / ``--seeds``) and ``--best-of``.

Kept out of cli.py so that file stays small; cli.py calls :func:`add_generate_options` when it
builds the parser and :func:`resolve_generate_args` first thing in ``_run_generate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from foleyserve.cli import UsageError

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest, GenerationResult

# Engine flags that --auto decides; a flag given explicitly keeps its value. The parser's defaults
# for these are None (set below) so an explicit value can be told from the default.
AUTO_FIELDS = ("model", "precision", "offload", "device", "step_cache")
PLAIN_DEFAULTS = {"model": "xxl", "offload": "none"}
MAX_SAMPLES = 16


def add_generate_options(p: argparse.ArgumentParser) -> None:
    """Declare ``--auto``, ``--duration`` (if not declared yet), ``--num-samples``, ``--seeds``, ``--best-of``, ``--rank``."""
    p.add_argument("--auto", action="store_true",
                   help="choose model size, precision, offload and step cache for this machine and clip, and say why; flags given explicitly win")
    if not any("--duration" in a.option_strings for a in p._actions):
        p.add_argument("--duration", type=float, metavar="SECONDS",
                       help="without a VIDEO: text to audio of this many seconds (0.64-15), from --prompt alone")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="N variations in one batch, seeds SEED..SEED+N-1; each written as NAME_seed{S}.EXT")
    p.add_argument("--seeds", metavar="S1,S2,...", help="variations with these seeds (instead of --seed / --num-samples)")
    p.add_argument("--best-of", type=int, metavar="N", help="generate N variations and keep the best by --rank (needs foleyserve.scoring)")
    p.add_argument("--rank", default="desync,clap", metavar="MEASURES", help="what --best-of ranks by (default desync,clap)")
    p.set_defaults(model=None, offload=None)


def seeds_from_args(args: argparse.Namespace) -> list[int] | None:
    """The variation seeds the flags ask for, or None for a single sample (``--seed``)."""
    given = [name for name in ("num_samples", "seeds", "best_of") if getattr(args, name, None) is not None]
    if len(given) > 1:
        raise UsageError(f"--{given[0].replace('_', '-')} and --{given[1].replace('_', '-')} do not combine; pass one")
    if getattr(args, "seeds", None) is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SAMPLES:
            raise UsageError(f"--seeds needs 1 to {MAX_SAMPLES} different seeds, got {args.seeds!r}")
        return seeds
    n = getattr(args, "num_samples", None) or getattr(args, "best_of", None)
    if n is None:
        return None
    if not 1 <= n <= MAX_SAMPLES:
        raise UsageError(f"--num-samples/--best-of must be 1 to {MAX_SAMPLES}, got {n}")
    return [args.seed + i for i in range(n)]


def check_best_of(args: argparse.Namespace) -> None:
    """``--best-of``: the hook for ranking variations with :mod:`foleyserve.scoring`.

    The scorers (DeSync, CLAP audio-text; ``scoring.score_candidates`` / ``scoring.rank``) are not
    wired in yet: this refuses rather than silently keeping every sample. To wire it: generate the
    variations (``run_requested``), score their waveforms against the prepared features, keep
    ``rank(..., by=args.rank.split(","))[0]`` and write only that one to ``--out``."""
    if getattr(args, "best_of", None) is None:
        return
    raise UsageError("--best-of is not available yet in `generate` (the scorers are not wired in); "
                     "use --num-samples N and compare the files")


def resolve_generate_args(args: argparse.Namespace) -> None:
    """Fill the engine flags: from ``--auto`` (printed with its reasons on stderr) where not given
    explicitly, else the plain defaults. Also checks the text-to-audio and variation flags."""
    seeds_from_args(args)
    check_best_of(args)
    if getattr(args, "video", None) is None and getattr(args, "duration", None) is None and getattr(args, "csv", None) is None:
        raise UsageError("no input: pass a VIDEO file, or --duration SECONDS for text to audio "
                         "(for a CSV of jobs, use `foleyserve batch JOBS.csv --out-dir DIR`)")
    if getattr(args, "auto", False):
        from foleyserve.autoconfig import available_models, choose, gather_facts

        if args.demo:
            print("foleyserve: --auto decides for the real model; the demo model keeps its own settings", file=sys.stderr)
        decision = choose(gather_facts(args.device or "auto"), clip_seconds=_clip_seconds(args),
                          models=available_models(args.model_dir), device=args.device or "auto")
        print(f"foleyserve: {decision.describe()}", file=sys.stderr)
        explicit = {k for k in AUTO_FIELDS if getattr(args, k, None) is not None and not (k == "device" and args.device == "auto")}
        if explicit:
            print(f"foleyserve: kept as given: {', '.join('--' + k.replace('_', '-') for k in sorted(explicit))}", file=sys.stderr)
        if not args.demo:
            for k, v in decision.engine_values().items():
                if k not in explicit:
                    setattr(args, k, v)
    for k, v in PLAIN_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def _clip_seconds(args: argparse.Namespace) -> float:
    if getattr(args, "duration", None) is not None:
        return float(args.duration)
    video: Path | None = getattr(args, "video", None)
    if video is not None:
        try:
            from foleyserve import media

            seconds = media.probe(video).duration
            if seconds:
                return float(seconds)
        except Exception:  # noqa: BLE001 - the checks before loading report a bad video
            pass
    return 15.04


def default_output(args: argparse.Namespace) -> Path:
    """``--out`` when given; else VIDEO_foley.mp4 beside the video, or foley.wav for text to audio."""
    if args.out is not None:
        return args.out
    if args.video is None:
        return Path("foley.wav")
    return args.video.with_name(args.video.stem + "_foley.mp4")


def complete_request(request: "GenerationRequest", args: argparse.Namespace) -> "GenerationRequest":
    """The request with what these options add: the duration of a text-to-audio request."""
    from dataclasses import replace

    if request.video is None and getattr(args, "duration", None) is not None:
        return replace(request, duration=args.duration)
    return request


def run_requested(engine: "Engine", request: "GenerationRequest", args: argparse.Namespace,
                  run_one: "Callable[[Engine, GenerationRequest], GenerationResult]") -> "list[GenerationResult]":
    """One result, or one per variation seed (``--num-samples`` / ``--seeds``), in one batch."""
    seeds = seeds_from_args(args)
    if seeds is None:
        return [run_one(engine, request)]
    from foleyserve.cli import _generation_errors, _Progress
    from foleyserve.pipeline.variations import generate_variations

    progress = _Progress()
    try:
        return generate_variations(engine, request, seeds, progress=progress)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    finally:
        progress.close()
