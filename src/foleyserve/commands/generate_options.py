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
    from foleyserve.cli import _Progress
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
    p.add_argument("--best-of", type=int, metavar="N",
                   help="generate N variations in one batch (seeds SEED..SEED+N-1), score each (DeSync, CLAP) and write only the best to --out")
    p.add_argument("--rank", metavar="MEASURES",
                   help="what --best-of ranks by, in order: desync, clap or both (default desync,clap; DeSync is lower-better "
                        "and needs 4.8 s of video: shorter clips rank by CLAP)")
    p.add_argument("--keep-all", action="store_true", help="with --best-of, also write every candidate as NAME_seed{S}.EXT")
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
    """``--best-of N [--rank MEASURES] [--keep-all]``: refuse what cannot run before any model loads.
    Sets ``args.rank_measures`` (a tuple) for :func:`run_requested`."""
    from foleyserve.scoring import parse_measures

    if getattr(args, "best_of", None) is None:
        for flag in ("rank", "keep_all"):
            if getattr(args, flag, None):
                raise UsageError(f"--{flag.replace('_', '-')} goes with --best-of N")
        return
    try:
        args.rank_measures = parse_measures(getattr(args, "rank", None) or "desync,clap")
    except ValueError as e:
        raise UsageError(f"--rank: {e}") from None


def check_request(request: "GenerationRequest", args: argparse.Namespace) -> None:
    """What the options refuse for this request before the model loads: best-of over 15 s."""
    if getattr(args, "best_of", None) is None or request.video is None:
        return
    from foleyserve.pipeline import longform

    if longform.plan_for(request) is not None:
        raise UsageError("--best-of runs on one clip of up to 15 s; for a longer range use --num-samples N "
                         "and compare the files (e.g. with `foleyserve score`)")


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def candidates_table(candidates: list[dict], ranked_by: list[str]) -> str:
    """The --best-of table: one row per candidate in seed order, its scores, rank and which was kept."""
    lines = [f"best of {len(candidates)}, ranked by {', then '.join(ranked_by)}:",
             f"  {'seed':>6}  {'desync_s':>8}  {'offsets_s':>13}  {'clap':>8}  {'rank':>4}"]
    for c in candidates:
        offsets = "n/a" if c["offsets_sec"] is None else "/".join(f"{o:+.2f}" for o in c["offsets_sec"])
        kept = "  <- kept" if c["kept"] else ""
        lines.append(f"  {c['seed']:>6}  {_fmt(c['desync'], '.2f'):>8}  {offsets:>13}  {_fmt(c['clap'], '.4f'):>8}  {c['rank']:>4}{kept}")
    return "\n".join(lines)


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
        if getattr(args, "best_of", None) is not None:
            return [_run_best_of(engine, request, args, seeds, progress)]
        return generate_variations(engine, request, seeds, progress=progress)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    finally:
        progress.close()


def _run_best_of(engine: "Engine", request: "GenerationRequest", args: argparse.Namespace, seeds: list[int],
                 progress: "_Progress") -> "GenerationResult":
    from foleyserve.pipeline.bestof import best_of

    result, candidates = best_of(engine, request, rank=args.rank_measures, seeds=seeds,
                                 keep_all=bool(getattr(args, "keep_all", False)), progress=progress)
    progress.close()  # the table goes to stdout: no bar left half-drawn above it
    # The ranking's notes (CLAP alone, demo scorers) are among the result's warnings, printed after.
    print(candidates_table(candidates, result.ranked_by or []))
    written = [c["file"] for c in candidates if c["file"]]
    if written:
        print(f"every candidate written: {', '.join(written)}")
    return result
