"""``foleyserve batch``: a CSV of jobs through the dynamic batcher, resumably. The one CSV path.

Each row becomes one job; rows that can share a denoising loop do (see
:mod:`foleyserve.runtime.batcher`). A row's output is named by its ``id`` column when the CSV has
one, else by a short hash of everything that decides the output (the video's path, size and
modification time, both prompts, seed, steps, guidance, format, loudness, bit depth) — never by its row number. Every
finished row, good or failed, is appended to ``OUT_DIR/manifest.jsonl`` with the hash of its
inputs; a rerun skips a row whose last record succeeded with the same inputs and whose file is
there. So reordering the CSV reuses every result, and editing a row (or replacing its video)
regenerates it. Outputs are written under a hidden partial name and renamed, so a file with the
final name is always complete.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import queue
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from foleyserve.cli import (
    EXIT_OK,
    SERVE_EXTRA,
    UsageError,
    _add_engine_args,
    _check_writable,
    add_level_args,
    check_level_args,
    _generation_errors,
    check_before_loading,
    engine_config_from_args,
    load_engine,
    missing_modules,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest
    from foleyserve.runtime.cache import FoleyCache

T = TypeVar("T", int, float)
FORMATS = ("mp4", "wav", "flac")
EXIT_ROWS_FAILED = 1
MANIFEST = "manifest.jsonl"
COLUMNS = "video,prompt[,id,negative_prompt,seed,steps,guidance]"
# An id names a file, so it is kept to characters that are safe in every file system.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class _Row:
    line: int  # in the CSV, for messages
    id: str
    key: str  # hash of the inputs that decide the output
    out: Path
    partial: Path
    inputs: dict[str, Any] = field(default_factory=dict)
    request: "GenerationRequest | None" = None  # None when the row cannot run (see error)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"row {self.id} (line {self.line})"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

    p = sub.add_parser(
        "batch",
        help="generate for every row of a CSV, batching the denoiser; resumable",
        description=(
            f"Generate Foley for every row of JOBS_CSV (columns {COLUMNS}; relative video paths are relative to "
            "the CSV). A row is written to OUT_DIR/<id>.<format>, where id is the row's 'id' column or, without one, "
            f"a hash of its inputs; OUT_DIR/{MANIFEST} records every row. A rerun skips rows already done with the "
            "same inputs (in any order) and regenerates edited ones. Every row is checked before the model loads."
        ),
    )
    p.add_argument("csv", metavar="JOBS_CSV", type=Path, help="the jobs file")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the results and the manifest")
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
        help=f"feature and result cache (default memory: reuses features within this run; needs {SERVE_EXTRA})",
    )
    p.add_argument("--cache-dir", type=Path, help="folder of the disk cache (default ~/.cache/foleyserve)")
    p.add_argument("--prompt", default="", help="for rows with an empty 'prompt'")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f"for rows without one (default {DEFAULT_NEGATIVE_PROMPT!r})")
    p.add_argument("--steps", type=int, default=50, help="denoising steps for rows without a 'steps' value (default 50)")
    p.add_argument("--guidance", type=float, default=4.5, help="guidance scale for rows without a 'guidance' value (default 4.5)")
    p.add_argument("--seed", type=int, default=0, help="seed for rows without a 'seed' value (default 0)")
    add_level_args(p)
    _add_engine_args(p)
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------ reading


def read_jobs(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, values) of every row of a jobs CSV; :class:`UsageError` if it is not one."""
    if not path.is_file():
        raise UsageError(f"jobs file {path} does not exist; check the path")
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "video" not in cols or "prompt" not in cols:
                raise UsageError(f"{path} needs a header with columns {COLUMNS}; found {cols}")
            rows = []
            for values in reader:
                if None in values:  # DictReader files surplus fields under the key None
                    raise UsageError(
                        f"{path} line {reader.line_num} has more fields than the header ({len(cols)}); "
                        f"put a prompt that contains commas in double quotes"
                    )
                rows.append((reader.line_num, {k.strip(): (v or "").strip() for k, v in values.items()}))
            return rows
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text CSV file") from None


def _number(row: dict[str, str], column: str, kind: Callable[[str], T], default: T) -> T:
    text = row.get(column, "")
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{column} {text!r} is not {what}; fix the '{column}' column or leave it empty") from None


def _inputs(args: argparse.Namespace, values: dict[str, str]) -> dict[str, Any]:
    """Everything that decides a row's output; raises ValueError for a value that cannot be used."""
    if not values.get("video"):
        raise ValueError("the 'video' column is empty; give a video path")
    video = Path(values["video"])
    video = video if video.is_absolute() else args.csv.parent / video
    inputs: dict[str, Any] = {
        "video": str(video.resolve()),
        "prompt": values.get("prompt") or args.prompt,
        "negative_prompt": values.get("negative_prompt") or args.negative_prompt,
        "seed": _number(values, "seed", int, args.seed),
        "steps": _number(values, "steps", int, args.steps),
        "guidance": _number(values, "guidance", float, args.guidance),
        "format": args.format,
        "loudness": args.loudness,
        "bit_depth": args.bit_depth,
    }
    try:
        # Size and modification time stand in for the content: a replaced video is a new input.
        stat = video.stat()
        inputs["video_size"], inputs["video_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    except OSError:
        inputs["video_size"] = inputs["video_mtime_ns"] = None
    return inputs


def input_key(inputs: dict[str, Any]) -> str:
    """Stable hash of a row's inputs (independent of its position in the CSV)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last record of every id in ``OUT_DIR/manifest.jsonl`` (a torn last line is ignored)."""
    records: dict[str, dict[str, Any]] = {}
    path = out_dir / MANIFEST
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a run killed mid-write
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records[record["id"]] = record
    return records


def _plan(args: argparse.Namespace, rows: list[tuple[int, dict[str, str]]]) -> tuple[list[_Row], int]:
    """The rows still to run (each with a request or the reason it cannot run) and how many are done."""
    from foleyserve.pipeline.requests import GenerationRequest

    has_ids = any("id" in values for _, values in rows)
    done = read_manifest(args.out_dir)
    seen: dict[str, int] = {}
    todo: list[_Row] = []
    skipped = 0
    for line, values in rows:
        try:
            inputs, problem = _inputs(args, values), None
        except ValueError as e:
            inputs, problem = {"line_values": values}, str(e)
        key = input_key(inputs)
        row_id = values.get("id", "") if has_ids else ""
        if row_id and not ID_PATTERN.fullmatch(row_id):
            raise UsageError(
                f"{args.csv} line {line}: id {row_id!r} cannot name a file; use letters, digits, '.', '_' and '-' "
                f"(at most 128, not starting with '.' or '-')"
            )
        row_id = row_id or key[:12]
        if row_id in seen:
            if has_ids and values.get("id"):
                raise UsageError(f"{args.csv}: duplicate id {row_id!r} on lines {seen[row_id]} and {line}; ids must be unique")
            print(f"line {line} repeats line {seen[row_id]} exactly; it is done once", file=sys.stderr)
            continue
        seen[row_id] = line
        out = args.out_dir / f"{row_id}.{args.format}"
        last = done.get(row_id)
        if last is not None and last.get("status") == "succeeded" and last.get("key") == key and out.exists():
            skipped += 1
            continue
        row = _Row(line=line, id=row_id, key=key, out=out, partial=args.out_dir / f".{row_id}.partial.{args.format}", inputs=inputs)
        todo.append(row)
        if problem is not None:
            row.error = problem
            continue
        if inputs["video_size"] is None:
            row.error = f"video {inputs['video']} does not exist; check the path in the 'video' column"
            continue
        row.request = GenerationRequest(
            video=Path(inputs["video"]), prompt=inputs["prompt"], negative_prompt=inputs["negative_prompt"],
            seed=inputs["seed"], steps=inputs["steps"], guidance=inputs["guidance"], output=row.partial,
            loudness=args.loudness, bit_depth=args.bit_depth,
        )
    return todo, skipped


def _check_rows(args: argparse.Namespace, config: Any, rows: list[_Row]) -> None:
    """Fail, before any model loads, every row whose request, prompts or video cannot run."""
    from foleyserve.preflight import PromptChecker, check_video

    try:
        checker = PromptChecker(demo=config.demo, model_dir=config.model_dir, clap_dir=config.clap_dir)
    except _generation_errors() as err:
        raise UsageError(str(err)) from None
    for row in rows:
        if row.request is None:
            continue
        try:
            row.request.validate()
            checker.check(row.request.prompt, row.request.negative_prompt)
            check_video(row.request.video)  # type: ignore[arg-type]
        except _generation_errors() as err:
            row.error, row.request = str(err), None


# ------------------------------------------------------------------------------------ running


class _Manifest:
    """Appends one JSON line per finished row; flushed at once so a crash loses nothing done."""

    def __init__(self, out_dir: Path) -> None:
        self.file = (out_dir / MANIFEST).open("a", encoding="utf-8")

    def record(self, row: _Row, status: str, seconds: float | None = None, cache_hit: bool = False) -> None:
        entry = {
            "id": row.id, "key": row.key, "line": row.line, "status": status, "error": row.error,
            "output": str(row.out) if status == "succeeded" else None,
            "seconds": round(seconds, 3) if seconds is not None else None, "cache_hit": cache_hit,
            "inputs": row.inputs, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _open_cache(args: argparse.Namespace, engine: "Engine") -> "FoleyCache | None":
    """The FoleyCache the flags ask for, or None for no caching."""
    url = args.cache
    if url == "off":
        return None
    try:
        from foleyserve.runtime.cache import FoleyCache
    except ImportError as err:
        if url is None:  # the default: run without a cache rather than fail
            print(f"foleyserve batch: no feature cache ({err.name} is not installed; {SERVE_EXTRA} adds it)", file=sys.stderr)
            return None
        raise UsageError(f"--cache {url} needs the serve extra ({err.name} is not installed); run: {SERVE_EXTRA}") from None
    try:
        return FoleyCache(url or "memory", directory=args.cache_dir, namespace=f"{engine.components.name}/{engine.precision}")
    except ValueError as e:
        raise UsageError(f"--cache {url}: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``foleyserve batch``; returns the exit code (1 when some rows failed)."""
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    check_level_args(args, args.format)
    if args.cache not in (None, "off", "memory", "disk") and not str(args.cache).startswith(("redis://", "rediss://")):
        raise UsageError(f"--cache {args.cache}: use off, memory, disk or redis://HOST:PORT/DB")
    if args.cache not in (None, "off"):
        # runtime.cache imports both at the top, whichever backend is asked for.
        missing = missing_modules(("diskcache", "redis"))
        if missing:
            raise UsageError(f"--cache {args.cache} needs the serve extra (missing: {', '.join(missing)}); run: {SERVE_EXTRA}")
    rows = read_jobs(args.csv)
    _check_writable(args.out_dir / "probe")
    config = engine_config_from_args(args)
    check_before_loading(config, [])
    todo, skipped = _plan(args, rows)
    if skipped:
        print(f"{skipped} of {len(rows)} rows already done in {args.out_dir} with the same inputs, skipping them", file=sys.stderr)
    _check_rows(args, config, todo)
    manifest = _Manifest(args.out_dir)
    try:
        for row in todo:
            if row.request is None:  # known before any model loads
                print(f"{row.label}: failed: {row.error}", file=sys.stderr)
                manifest.record(row, "failed")
        runnable = [r for r in todo if r.request is not None]
        if not runnable:
            return _report(todo, skipped, len(rows), generated=0, hits=0, seconds=0.0)
        engine = load_engine(config)
        return _run_batcher(args, engine, runnable, todo, skipped, len(rows), manifest)
    finally:
        manifest.close()


def _run_batcher(
    args: argparse.Namespace, engine: "Engine", runnable: list[_Row], todo: list[_Row], skipped: int, total: int, manifest: _Manifest
) -> int:
    from tqdm import tqdm

    from foleyserve.runtime.batcher import Batcher, BatcherConfig

    cache = _open_cache(args, engine)
    finished: queue.Queue = queue.Queue()
    by_job: dict[str, _Row] = {}

    def on_update(job: Any) -> None:
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
                _row_failed(bar, manifest, row, str(e))
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
                manifest.record(row, "succeeded", seconds=sum(job.result.timings.values()), cache_hit=job.cache_hit)
                bar.write(f"{row.label}: wrote {row.out}{' (from the cache)' if job.cache_hit else ''}", file=sys.stdout)
                for w in job.result.warnings:
                    if w not in seen_warnings:
                        seen_warnings.add(w)
                        bar.write(f"{row.label}: warning: {w}", file=sys.stderr)
                bar.update(1)
            else:
                _row_failed(bar, manifest, row, str(job.error) if job.error is not None else f"the job was {job.status}")
    finally:
        bar.close()
        for job_id in list(by_job):  # interrupted: stop what is still queued or running
            batcher.cancel(job_id)
        batcher.stop(timeout=5.0)
        for row in by_job.values():
            row.partial.unlink(missing_ok=True)
        if cache is not None:
            cache.close()
    return _report(todo, skipped, total, generated=generated, hits=hits, seconds=time.perf_counter() - start)


def _row_failed(bar: "tqdm", manifest: _Manifest, row: _Row, message: str) -> None:
    row.error = message
    row.partial.unlink(missing_ok=True)
    manifest.record(row, "failed")
    bar.write(f"{row.label}: failed: {message}", file=sys.stderr)
    bar.update(1)


def _report(todo: list[_Row], skipped: int, total: int, *, generated: int, hits: int, seconds: float) -> int:
    failed = sum(1 for r in todo if r.error is not None)
    cached = f" ({hits} from the cache)" if hits else ""
    print(f"{generated} generated{cached}, {skipped} already done, {failed} failed, of {total} rows in {seconds:.1f} s")
    return EXIT_OK if failed == 0 else EXIT_ROWS_FAILED
