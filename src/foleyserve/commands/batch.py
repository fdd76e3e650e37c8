"""``foleyserve batch``: a CSV of jobs through the dynamic batcher and the cache, resumably.

Each row becomes one job; rows that can share a denoising loop do (see
:mod:`foleyserve.runtime.batcher`). Row ``i`` is written to ``OUT_DIR/<i:04d>.<format>`` (the
same names as ``generate --csv``), first under a hidden partial name and then renamed, so a file
with the final name is always complete: a rerun skips those rows and redoes the rest.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from foleyserve.cli import (
    EXIT_OK,
    UsageError,
    _add_engine_args,
    _check_writable,
    _engine_from_args,
    _generation_errors,
    _read_jobs,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest
    from foleyserve.runtime.cache import FoleyCache

T = TypeVar("T", int, float)
FORMATS = ("mp4", "wav", "flac")
EXIT_ROWS_FAILED = 1


@dataclass
class _Row:
    index: int
    out: Path
    partial: Path
    request: "GenerationRequest | None" = None  # None when the row cannot run (see error)
    error: str | None = None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

    p = sub.add_parser(
        "batch",
        help="generate for every row of a CSV, batching the denoiser; resumable",
        description=(
            "Generate Foley for every row of JOBS_CSV (columns video,prompt[,negative_prompt,seed,steps,guidance]; "
            "relative video paths are relative to the CSV). Row i is written to OUT_DIR/<i:04d>.<format>; rows whose "
            "output already exists are skipped, so an interrupted run can simply be started again."
        ),
    )
    p.add_argument("csv", metavar="JOBS_CSV", type=Path, help="the jobs file")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the results")
    p.add_argument("--format", choices=FORMATS, default="mp4", help="output format (default mp4: the video with the new sound)")
    p.add_argument("--max-batch-size", type=int, default=4, help="most clips in one denoising loop (default 4)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a ready clip waits for others to batch with (default 10)")
    p.add_argument(
        "--length-bucket", choices=("exact", "second"), default="exact",
        help="exact: every clip keeps its full length (default); second: trim clips to whole seconds so that "
        "similar lengths batch together",
    )
    p.add_argument(
        "--cache", default=None, metavar="off|memory|disk|redis://HOST:PORT/DB",
        help="feature and result cache (default memory: reuses features within this run)",
    )
    p.add_argument("--cache-dir", type=Path, help="folder of the disk cache (default ~/.cache/foleyserve)")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f"for rows without one (default {DEFAULT_NEGATIVE_PROMPT!r})")
    p.add_argument("--steps", type=int, default=50, help="denoising steps for rows without a 'steps' value (default 50)")
    p.add_argument("--guidance", type=float, default=4.5, help="guidance scale for rows without a 'guidance' value (default 4.5)")
    p.add_argument("--seed", type=int, default=0, help="seed for rows without a 'seed' value (default 0)")
    _add_engine_args(p)
    p.set_defaults(run=run)


def _number(row: dict[str, str], column: str, kind: Callable[[str], T], default: T) -> T:
    text = row.get(column, "")
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{column} {text!r} is not {what}; fix the '{column}' column or leave it empty") from None


def _parse_rows(args: argparse.Namespace, rows: list[dict[str, str]]) -> tuple[list[_Row], int]:
    """The rows still to run (each with a request or the reason it cannot run) and how many are done."""
    from foleyserve.pipeline.requests import GenerationRequest

    base = args.csv.parent
    todo: list[_Row] = []
    skipped = 0
    for i, values in enumerate(rows):
        out = args.out_dir / f"{i:04d}.{args.format}"
        if out.exists():  # outputs appear only by rename, so this row finished in an earlier run
            skipped += 1
            continue
        row = _Row(index=i, out=out, partial=args.out_dir / f".{i:04d}.partial.{args.format}")
        todo.append(row)
        try:
            if not values.get("video"):
                raise ValueError("the 'video' column is empty; give a video path")
            video = Path(values["video"])
            video = video if video.is_absolute() else base / video
            if not video.is_file():
                raise ValueError(f"video {video} does not exist; check the path in the 'video' column")
            row.request = GenerationRequest(
                video=video,
                prompt=values.get("prompt", ""),
                negative_prompt=values.get("negative_prompt") or args.negative_prompt,
                seed=_number(values, "seed", int, args.seed),
                steps=_number(values, "steps", int, args.steps),
                guidance=_number(values, "guidance", float, args.guidance),
                output=row.partial,
            )
        except ValueError as e:
            row.error = str(e)
    return todo, skipped


def _open_cache(args: argparse.Namespace, engine: "Engine") -> "FoleyCache | None":
    """The FoleyCache the flags ask for, or None for no caching."""
    url = args.cache
    if url == "off":
        return None
    try:
        from foleyserve.runtime.cache import FoleyCache
    except ImportError:
        if url is None:  # the default: run without a cache rather than fail
            return None
        raise UsageError(f"--cache {url}: this installation has no cache module (foleyserve.runtime.cache); pass --cache off") from None
    try:
        return FoleyCache(url or "memory", directory=args.cache_dir, namespace=f"{engine.components.name}/{engine.precision}")
    except ValueError as e:
        raise UsageError(f"--cache {url}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from foleyserve.runtime.batcher import Batcher, BatcherConfig

    if not args.csv.exists():
        raise UsageError(f"jobs file {args.csv} does not exist; check the path")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    rows = _read_jobs(args.csv)
    _check_writable(args.out_dir / "probe")
    todo, skipped = _parse_rows(args, rows)
    if skipped:
        print(f"{skipped} of {len(rows)} rows already done in {args.out_dir}, skipping them", file=sys.stderr)
    for row in todo:
        if row.request is None:  # known before any model loads
            print(f"row {row.index}: failed: {row.error}", file=sys.stderr)
    runnable = [r for r in todo if r.request is not None]
    if not runnable:
        return _report(todo, skipped, len(rows), generated=0, hits=0, seconds=0.0)
    try:
        engine = _engine_from_args(args)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    cache = _open_cache(args, engine)

    finished: queue.Queue = queue.Queue()
    by_job: dict[str, _Row] = {}

    def on_update(job) -> None:
        if job.done:
            finished.put(job)

    # Every runnable row is queued at once: a queued job holds only its request, and the batcher
    # keeps just a few prepared (large) jobs ahead of the denoiser.
    config = BatcherConfig(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=len(runnable), length_bucket=args.length_bucket
    )
    batcher = Batcher(engine, config, cache=cache, on_update=on_update)
    start = time.perf_counter()
    generated = hits = 0
    seen_warnings: set[str] = set()
    bar = tqdm(total=len(runnable), unit="clip", file=sys.stderr, disable=None, dynamic_ncols=True)
    try:
        for row in runnable:
            try:
                job = batcher.submit(row.request, priority="bulk")
            except ValueError as e:  # RequestError: steps or guidance out of range, say
                _row_failed(bar, row, str(e))
                continue
            by_job[job.id] = row
        batcher.start()
        pending = len(by_job)
        while pending:
            try:
                job = finished.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                continue
            pending -= 1
            row = by_job.pop(job.id)
            if job.status == "succeeded":
                row.partial.replace(row.out)
                generated += 1
                hits += job.cache_hit
                bar.write(f"row {row.index}: wrote {row.out}{' (from the cache)' if job.cache_hit else ''}", file=sys.stdout)
                for w in job.result.warnings:
                    if w not in seen_warnings:
                        seen_warnings.add(w)
                        bar.write(f"row {row.index}: warning: {w}", file=sys.stderr)
                bar.update(1)
            else:
                _row_failed(bar, row, str(job.error) if job.error is not None else f"the job was {job.status}")
    finally:
        bar.close()
        for job_id in list(by_job):  # interrupted: stop what is still queued or running
            batcher.cancel(job_id)
        batcher.stop(timeout=5.0)
        for row in by_job.values():
            row.partial.unlink(missing_ok=True)
        if cache is not None:
            cache.close()
    return _report(todo, skipped, len(rows), generated=generated, hits=hits, seconds=time.perf_counter() - start)


def _row_failed(bar: "tqdm", row: _Row, message: str) -> None:
    row.error = message
    row.partial.unlink(missing_ok=True)
    bar.write(f"row {row.index}: failed: {message}", file=sys.stderr)
    bar.update(1)


def _report(todo: list[_Row], skipped: int, total: int, *, generated: int, hits: int, seconds: float) -> int:
    failed = sum(1 for r in todo if r.error is not None)
    cached = f" ({hits} from the cache)" if hits else ""
    print(f"{generated} generated{cached}, {skipped} already done, {failed} failed, of {total} rows in {seconds:.1f} s")
    return EXIT_OK if failed == 0 else EXIT_ROWS_FAILED
