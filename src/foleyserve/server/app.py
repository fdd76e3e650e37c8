"""The HTTP service: a FastAPI app around one engine, one batcher, one cache and one job store.

    POST   /v1/generations            upload a video -> 202 job (or 200 when ?wait= saw it finish)
    GET    /v1/generations            recent jobs
    GET    /v1/generations/{id}       status, progress, timings, error
    DELETE /v1/generations/{id}       cancel
    GET    /v1/generations/{id}/audio the result audio (wav, or flac when asked for)
    GET    /v1/generations/{id}/video the mp4 with the new sound (output=mp4 only)
    GET    /v1/info                   limits and defaults (for clients and the web page)
    GET    /healthz /readyz /metrics  liveness, readiness, Prometheus
    GET    /  /static/...             the web page

Every error is ``{"error": {"code": ..., "message": ...}}``; no traceback ever leaves the process.
The model loads in a background thread, so /healthz answers at once and /readyz turns 200 when
jobs can run. Job state lives in SQLite (see :mod:`foleyserve.server.jobs`): a restart serves
finished jobs again and re-queues interrupted ones whose upload is still on disk.
"""

from __future__ import annotations

import asyncio
import codecs
import hmac
import logging
import math
import re
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Literal

import av
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from foleyserve import media
from foleyserve.config import EngineConfig
from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT, GenerationRequest, RequestError
from foleyserve.server.jobs import ACTIVE_STATUSES, FINAL_STATUSES, JobRecord, JobStore
from foleyserve.server.metrics import CONTENT_TYPE, LiveSources, ServerMetrics
from foleyserve.server.settings import ServerConfig

log = logging.getLogger("foleyserve.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUTS = ("mp4", "wav", "flac")
MAX_WAIT_S = 600.0
MAX_SEED = 2**63 - 1
PROGRESS_WRITE_INTERVAL_S = 0.2
WAIT_POLL_S = 0.05
UPLOAD_CHUNK = 1 << 20
# Room for the multipart framing and the text fields on top of the video itself.
FORM_OVERHEAD_BYTES = 256 * 1024
# A clip needs 16 frames at 25 fps; refuse at upload only when the header is clearly shorter, the
# decoder makes the exact call (a header can undercount).
MIN_HEADER_SECONDS = 0.6
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp4": "video/mp4"}
# Batcher error codes whose message is meant for the user (the others are internal).
USER_ERROR_CODES = ("invalid_video", "video_too_short", "invalid_request", "invalid_parameter")
FORM_FIELDS = ("video", "prompt", "negative_prompt", "steps", "guidance", "seed", "output", "priority", "keep_original_audio")


# ------------------------------------------------------------------------------------- errors


class ApiError(HTTPException):
    """An error answer with a stable machine-readable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 410: "expired", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "invalid_parameter", 429: "queue_full", 503: "not_ready",
}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------ response models


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_video, queue_full, not_found")
    message: str = Field(description="What went wrong and what to do about it")


class ErrorBody(BaseModel):
    error: ErrorInfo


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done")
    total: int = Field(description="Denoising steps in all (0 until the job reaches the denoiser)")


class JobBody(BaseModel):
    id: str = Field(description="Server-generated job id (32 hex digits)")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    priority: str = Field(description="interactive or bulk")
    progress: Progress
    cache_hit: bool = Field(description="True when the result came from the result cache (no model ran)")
    timings: dict[str, float] = Field(description="Seconds per pipeline stage (decode, siglip2, synchformer, clap, dit, dac, write)")
    error: ErrorInfo | None = Field(description="Why the job failed; null otherwise")
    created: float = Field(description="Unix time the upload was accepted")
    started: float | None = Field(description="Unix time the job started running")
    finished: float | None = Field(description="Unix time the job ended")
    audio_url: str | None = Field(description="Where to download the audio once succeeded")
    video_url: str | None = Field(description="Where to download the mp4 once succeeded (output=mp4 only)")
    expired: bool = Field(description="True when retention deleted the result files")
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    output: str = Field(description="Requested format: mp4, wav or flac")
    keep_original_audio: float | None = Field(description="Gain of the source video's own sound mixed under the Foley (mp4)")
    duration: float | None = Field(description="Seconds of generated audio")
    video_duration: float | None = Field(description="Seconds of the uploaded video")
    batch_size: int | None = Field(description="Jobs that shared this job's denoising loop")
    warnings: list[str] = Field(description="Notes about the result (e.g. a video longer than the model covers)")


class JobList(BaseModel):
    items: list[JobBody] = Field(description="Most recent first")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str
    precision: str
    device: str


_ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": ErrorBody, "description": "Unknown job id"},
}


# --------------------------------------------------------------------------------- the service


class Service:
    """The state behind the routes: store, metrics, and (once loaded) engine, cache and batcher."""

    def __init__(self, config: ServerConfig, engine_config: EngineConfig | None, engine: Any | None) -> None:
        if engine is None and engine_config is None:
            raise ValueError("create_app needs an engine_config (to load a model) or a prebuilt engine")
        self.config = config
        self.engine_config = engine_config
        self.engine = engine
        self.store = JobStore(config.data_dir)
        self.cache: Any | None = None
        self.batcher: Any | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        # Set while compiled steps are being warmed up: {"done", "total", "current"}.
        self.warmup: dict[str, Any] | None = None
        self.metrics = ServerMetrics(
            LiveSources(
                queue_depth=lambda: self.batcher.queue_depth() if self.batcher is not None else None,
                cache_stats=lambda: self.cache.stats() if self.cache is not None else None,
                ready=self.ready.is_set,
                engine_info=self.engine_info,
            )
        )
        self._lock = threading.Lock()
        self._progress_written: dict[str, float] = {}
        self._user_cancelled: set[str] = set()
        self._stopping = False
        self._stop_janitor = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.engine is not None:
            self._load()  # nothing slow left to do: be ready before the first request
        else:
            t = threading.Thread(target=self._load, name="foleyserve-loader", daemon=True)
            t.start()
            self._threads.append(t)
        janitor = threading.Thread(target=self._janitor, name="foleyserve-retention", daemon=True)
        janitor.start()
        self._threads.append(janitor)

    def stop(self) -> None:
        """Shut down: queued jobs stay queued on disk (the next start re-runs them); the running
        batch gets ``shutdown_grace_s`` to finish, then is cut short and also re-runs next time."""
        with self._lock:
            self._stopping = True
        self._stop_janitor.set()
        self.ready.clear()
        batcher, cache = self.batcher, self.cache
        if batcher is not None:
            try:
                batcher.stop(timeout=self.config.shutdown_grace_s)
                leftovers = [rec.id for rec in self.store.active() if batcher.cancel(rec.id)]
                if leftovers:
                    log.info("shutdown: %d running job(s) cut short; they re-run on the next start", len(leftovers))
                    batcher.stop(timeout=10.0)
            except Exception:
                log.exception("stopping the batcher failed")
        if cache is not None:
            try:
                cache.close()
            except Exception:
                log.exception("closing the cache failed")
        self.store.close()

    def _load(self) -> None:
        try:
            from foleyserve.runtime.batcher import Batcher, BatcherConfig
            from foleyserve.runtime.cache import FoleyCache

            engine = self.engine
            if engine is None:
                from foleyserve.pipeline.pipeline import Engine

                log.info("loading the model (%s)", self.engine_config)
                engine = Engine.from_config(self.engine_config)  # type: ignore[arg-type]
            c = self.config
            cache = FoleyCache(
                None if c.cache == "off" else c.cache,
                directory=c.resolved_cache_dir,
                max_bytes=int(c.cache_max_gb * 2**30),
                namespace=f"{engine.components.name}|{engine.precision}",
                memory_bytes=int(c.cache_memory_mb * 2**20),
            )
            self._warm_up(engine)
            batcher = Batcher(
                engine,
                BatcherConfig(
                    max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                    max_queue=c.max_queue, length_bucket=c.length_bucket,
                ),
                cache,
                on_update=self._on_update,
                on_batch=self._on_batch,
            )
            batcher.start()
        except Exception as e:
            log.exception("the model or the serving runtime failed to load; /readyz stays 503")
            self.load_error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self.engine, self.cache, self.batcher = engine, cache, batcher
        if stopping:  # the app shut down while the model was loading
            batcher.stop(timeout=1.0)
            cache.close()
            return
        try:
            self._recover()
        except Exception:
            log.exception("re-queueing the jobs of the previous run failed; they stay as recorded")
        self.ready.set()
        log.info("ready: model %s, precision %s, device %s", engine.components.name, engine.precision, engine.device)

    def _warm_up(self, engine: Any) -> None:
        """Compile the profile's step buckets before the server reports ready (compile on only)."""
        c = self.config
        if not getattr(engine, "compiled", False) or not c.warmup_seconds:
            return

        def progress(done: int, total: int, what: str) -> None:
            self.warmup = {"done": done, "total": total, "current": what}
            log.info("warm-up %d/%d: %s", done, total, what)

        records = engine.warm_up(c.warmup_seconds, batch_sizes=c.warmup_batch_sizes, progress=progress)
        self.warmup = {"done": len(records), "total": len(records), "current": "done", "buckets": records}

    def engine_info(self) -> dict[str, str] | None:
        e = self.engine if self.ready.is_set() else None
        if e is None:
            return None
        return {"model": str(e.components.name), "precision": str(e.precision), "device": str(e.device)}

    # -- restart recovery and retention -----------------------------------------------------------

    def _recover(self) -> None:
        """Re-queue jobs a previous process left queued or running, if their upload survived."""
        from foleyserve.runtime.batcher import QueueFull

        requeued = failed = 0
        live: list[str] = []
        for rec in self.store.active():
            upload = self.store.upload_path(rec.id)
            if rec.upload and upload.is_file():
                self.store.update(rec.id, status="queued", started=None, progress_step=0, progress_total=0)
                try:
                    self.batcher.submit(self._request_for(rec, upload), priority=rec.priority, job_id=rec.id)  # type: ignore[union-attr]
                    requeued += 1
                    live.append(upload.name)
                    continue
                except (QueueFull, RequestError) as e:
                    why = f"it could not be re-queued after a restart ({e}); submit it again"
            else:
                why = f"the server stopped while this job was {rec.status} and its upload is gone; submit it again"
            self._fail_now(rec.id, "interrupted", why)
            failed += 1
        for orphan in self.store.orphan_uploads(keep=live):
            _unlink(orphan)
        if requeued or failed:
            log.info("restart: %d interrupted job(s) re-queued, %d marked failed", requeued, failed)

    def _fail_now(self, job_id: str, code: str, message: str) -> None:
        if self.store.update_if_active(
            job_id, status="failed", finished=time.time(), error_code=code, error_message=message, upload=None
        ):
            self.metrics.requests.labels(status="failed").inc()
        _unlink(self.store.upload_path(job_id))

    def enforce_retention(self, now: float | None = None) -> list[str]:
        c = self.config
        expired = self.store.enforce_retention(
            max_age_s=c.retention_hours * 3600 if c.retention_hours is not None else None,
            max_bytes=int(c.retention_max_gb * 2**30) if c.retention_max_gb is not None else None,
            now=now,
        )
        if expired:
            log.info("retention: deleted the results of %d job(s)", len(expired))
        return expired

    def _janitor(self) -> None:
        while True:
            try:
                self.enforce_retention()
            except Exception:
                log.exception("result retention failed; will retry")
            if self._stop_janitor.wait(self.config.retention_interval_s):
                return

    # -- batcher callbacks (worker threads) --------------------------------------------------------

    def _on_batch(self, size: int, stages: dict[str, float]) -> None:
        try:
            self.metrics.observe_batch(size, stages)
        except Exception:
            log.exception("recording batch metrics failed")

    def _on_update(self, job: Any) -> None:
        # Never let bookkeeping break the batcher's worker: a failure here is logged and the job
        # stays as last recorded (a restart re-queues it from its upload).
        try:
            self._record(job)
        except Exception:
            log.exception("recording the state of job %s failed", getattr(job, "id", "?"))

    def _record(self, job: Any) -> None:
        status = job.status
        step, total = _progress(job)
        now = time.time()
        if status == "running":
            with self._lock:
                last = self._progress_written.get(job.id)
                if last is not None and now - last < PROGRESS_WRITE_INTERVAL_S:
                    return
                self._progress_written[job.id] = now
            changes: dict[str, Any] = {"status": "running", "progress_step": step, "progress_total": total}
            if last is None:
                rec = self.store.get(job.id)
                if rec is not None and rec.started is None:
                    changes["started"] = now
                    self.metrics.queue_wait_seconds.observe(max(now - rec.created, 0.0))
            self.store.update_if_active(job.id, **changes)
            return
        if status not in FINAL_STATUSES:
            return
        with self._lock:
            self._progress_written.pop(job.id, None)
            user_cancelled = job.id in self._user_cancelled
            self._user_cancelled.discard(job.id)
            if self._stopping and status != "succeeded" and not user_cancelled:
                # Shutting down: keep the job queued with its upload so the next start re-runs it.
                return
        rec = self.store.get(job.id)
        if rec is None or rec.is_final:
            return
        # A result-cache hit never reports "running": it starts and ends at once.
        started = rec.started if rec.started is not None or status != "succeeded" else now
        changes = {
            "status": status, "started": started, "finished": now, "cache_hit": bool(getattr(job, "cache_hit", False)),
            "batch_size": getattr(job, "batch_size", None), "progress_step": step, "progress_total": total,
            "upload": None,
        }
        if status == "succeeded":
            try:
                changes.update(self._keep_result(job, rec))
            except Exception as e:
                log.exception("saving the result of job %s failed", job.id)
                self.store.remove_results(job.id)
                changes.update(status="failed", error_code="result_write_failed",
                               error_message=f"the result could not be saved on the server ({type(e).__name__}); submit the job again")
        else:
            self.store.remove_results(job.id)
            if status == "failed":
                code, message = self._describe_failure(job)
                changes.update(error_code=code, error_message=message)
            else:
                changes.update(error_code="cancelled", error_message="the job was cancelled")
        if self.store.update_if_active(job.id, **changes):
            self.metrics.observe_finished(
                changes["status"], timings=changes.get("timings", {}),
                seconds=now - rec.created, audio_seconds=changes.get("audio_seconds"),
            )
        _unlink(self.store.upload_path(job.id))

    def _keep_result(self, job: Any, rec: JobRecord) -> dict[str, Any]:
        result = job.result
        if result is None:
            raise RuntimeError("the batcher reported success without a result")
        fmt = rec.params["output"]
        main = self.store.result_path(f"{rec.id}.{fmt}")
        if not main.is_file():
            raise FileNotFoundError(f"the batcher did not write {main.name}")
        files = {"video" if fmt == "mp4" else "audio": main.name}
        if fmt == "mp4":
            # Players and the web page want the audio on its own; writing it now costs a few ms
            # and spares the download route from demuxing AAC.
            wav = self.store.result_path(f"{rec.id}.wav")
            media.write_audio(wav, result.waveform, result.sample_rate)
            files["audio"] = wav.name
        size = sum(self.store.result_path(n).stat().st_size for n in files.values())
        return {
            "files": files,
            "result_bytes": size,
            "timings": {k: float(v) for k, v in (result.timings or {}).items()},
            "audio_seconds": float(result.audio_seconds),
            "video_seconds": float(result.video_seconds),
            "warnings": [self._scrub(str(w), rec.id) for w in (result.warnings or [])],
        }

    def _describe_failure(self, job: Any) -> tuple[str, str]:
        err = job.error
        code = job.error_code
        if code in USER_ERROR_CODES or isinstance(err, (RequestError, media.MediaError)):
            default = "invalid_video" if isinstance(err, media.MediaError) else "invalid_request"
            return code or default, self._scrub(str(err), job.id)
        # The batcher logged the traceback; the client gets no internals (paths, library errors).
        log.warning("job %s failed with an internal error: %s", job.id, err)
        return (
            "internal_error" if code in (None, "internal") else code,
            f"the generation failed with an internal error; the server log has the details (job {job.id})",
        )

    def _scrub(self, text: str, job_id: str) -> str:
        """Server paths out of messages shown to clients."""
        upload = self.store.upload_path(job_id)
        for p in {str(upload.resolve()), str(upload)}:
            text = text.replace(p, "the uploaded video")
        for p in {str(self.store.results_dir.resolve()), str(self.store.results_dir)}:
            text = text.replace(p + "/", "").replace(p, "the results folder")
        return text

    # -- requests --------------------------------------------------------------------------------

    def _request_for(self, rec: JobRecord, upload: Path) -> GenerationRequest:
        p = rec.params
        return GenerationRequest(
            video=upload, prompt=p["prompt"], negative_prompt=p["negative_prompt"], steps=int(p["steps"]),
            guidance=float(p["guidance"]), seed=int(p["seed"]),
            output=self.store.result_path(f"{rec.id}.{p['output']}"),
            keep_original_audio_gain=p.get("keep_original_audio"),
        )

    def body(self, rec: JobRecord, root: str = "") -> dict[str, Any]:
        step, total, status = rec.progress_step, rec.progress_total, rec.status
        batcher = self.batcher
        if status in ACTIVE_STATUSES and batcher is not None:
            # Progress is written to disk at most every 0.2 s; the live job is fresher.
            live = batcher.get(rec.id)
            if live is not None and live.status in ACTIVE_STATUSES:
                status = live.status
                step, total = _progress(live)
        ok = rec.status == "succeeded" and rec.expired is None
        base = f"{root}/v1/generations/{rec.id}"
        p = rec.params
        return {
            "id": rec.id, "status": status, "priority": rec.priority,
            "progress": {"step": step, "total": total},
            "cache_hit": rec.cache_hit, "timings": rec.timings,
            "error": {"code": rec.error_code or "failed", "message": rec.error_message or ""} if rec.status == "failed" else None,
            "created": rec.created, "started": rec.started, "finished": rec.finished,
            "audio_url": f"{base}/audio" if ok and "audio" in rec.files else None,
            "video_url": f"{base}/video" if ok and "video" in rec.files else None,
            "expired": rec.expired is not None,
            "prompt": p["prompt"], "negative_prompt": p["negative_prompt"], "steps": p["steps"],
            "guidance": p["guidance"], "seed": p["seed"], "output": p["output"],
            "keep_original_audio": p.get("keep_original_audio"),
            "duration": rec.audio_seconds, "video_duration": rec.video_seconds,
            "batch_size": rec.batch_size, "warnings": rec.warnings,
        }

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._user_cancelled.add(job_id)
        batcher = self.batcher
        if batcher is not None and batcher.cancel(job_id):
            return  # queued: cancelled now (on_update records it); running: leaves at the next step
        with self._lock:
            self._user_cancelled.discard(job_id)
        if batcher is not None and batcher.get(job_id) is not None:
            return  # it ended just now; on_update records how
        # Unknown to the batcher (its row awaits re-queueing while the model loads): end it here.
        if self.store.update_if_active(
            job_id, status="cancelled", finished=time.time(), error_code="cancelled",
            error_message="the job was cancelled", upload=None,
        ):
            self.metrics.requests.labels(status="cancelled").inc()
            _unlink(self.store.upload_path(job_id))


def _progress(job: Any) -> tuple[int, int]:
    try:
        step, total = job.progress
        return int(step), int(total)
    except (TypeError, ValueError):
        return 0, 0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not delete %s", path)


# ------------------------------------------------------------------------------ upload checks


def _save_upload(source: BinaryIO, dest: Path, limit: int) -> int:
    """Copy an upload in chunks, stopping as soon as it passes the limit."""
    size = 0
    try:
        with open(dest, "wb") as out:
            while chunk := source.read(UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "payload_too_large", _too_large_message(limit))
                out.write(chunk)
    except BaseException:
        _unlink(dest)
        raise
    if size == 0:
        _unlink(dest)
        raise ApiError(422, "invalid_video", "the uploaded video is empty (0 bytes); send the file's contents in the 'video' field")
    return size


def _too_large_message(limit: int) -> str:
    return (
        f"the upload is larger than this server's limit of {limit / 2**20:.3g} MiB; send a shorter or more "
        f"compressed clip (the model uses at most the first 15 s)"
    )


_NOT_VIDEO_MAGIC = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"), (b"ID3", "an MP3 audio file"),
    (b"fLaC", "a FLAC audio file"), (b"BM", None), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
)
_VIDEO_MAGIC_AT_4 = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


def _describe_non_video(head: bytes) -> str | None:
    """What an upload obviously is when it is not a video, from its first bytes."""
    for magic, what in _NOT_VIDEO_MAGIC:
        if what and head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "a WAV audio file"
    if b"\x00" not in head:
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return None
        stripped = text.lstrip().lower()
        if stripped.startswith(("<!doctype html", "<html")):
            return "an HTML page"
        if stripped.startswith(("{", "[")):
            return "JSON text"
        return "a text file"
    return None


def _looks_like_container(head: bytes) -> bool:
    return (
        (len(head) >= 8 and head[4:8] in _VIDEO_MAGIC_AT_4)
        or head.startswith((b"\x1aE\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba"))
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # MPEG-TS sync bytes
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
    )


def inspect_upload(path: Path, config: ServerConfig, filename: str | None) -> media.VideoInfo:
    """Check an upload is a usable video before it is queued; ApiError otherwise."""
    with open(path, "rb") as f:
        head = f.read(512)
    received = f" (received {filename!r})" if filename else ""
    advice = "send a video file such as MP4 (H.264), MOV, MKV or WebM"
    try:
        info = media.probe(path)
    except media.MediaError as e:
        # FFmpeg had the first say; only now decide whether this is a broken video or no video.
        kind = _describe_non_video(head)
        if kind is not None:
            raise ApiError(415, "unsupported_media_type", f"the upload is {kind}, not a video{received}; {advice}") from None
        streams = _stream_kinds(path)
        if streams is not None and "video" not in streams["kinds"]:
            what = f"a {streams['format']} file with {', '.join(streams['kinds']) or 'no'} stream(s) and no video"
            raise ApiError(415, "unsupported_media_type", f"the upload is {what}{received}; {advice}") from None
        if streams is None and not _looks_like_container(head):
            raise ApiError(415, "unsupported_media_type", f"the upload is not a video format FFmpeg recognises{received}; {advice}") from None
        raise ApiError(422, "invalid_video", str(e).replace(str(path), "the uploaded video")) from None
    if info.container.endswith("_pipe") or info.container == "image2":
        kind = _describe_non_video(head) or f"a still image ({info.container.removesuffix('_pipe')})"
        raise ApiError(415, "unsupported_media_type", f"the upload is {kind}, not a video{received}; send a video clip")
    if info.duration is not None and info.duration < MIN_HEADER_SECONDS:
        raise ApiError(
            422, "video_too_short",
            f"the video is {info.duration:.2f} s long; the model needs at least 16 frames at 25 fps (0.64 s); use a longer clip",
        )
    pixels = info.width * info.height
    if pixels > config.max_video_pixels:
        raise ApiError(
            422, "video_too_large",
            f"the video is {info.width}x{info.height} ({pixels / 1e6:.1f} MP per frame); this server accepts at most "
            f"{config.max_video_pixels / 1e6:.1f} MP per frame; scale it down (the model sees 512x512 and 224x224 frames anyway)",
        )
    return info


def _stream_kinds(path: Path) -> dict[str, Any] | None:
    try:
        with av.open(str(path), metadata_errors="replace") as c:
            return {"format": c.format.name, "kinds": [s.type for s in c.streams]}
    except (av.error.FFmpegError, OSError):
        return None


# ------------------------------------------------------------------------------- body limit


class _BodyLimit:
    """Refuse request bodies over the limit while they arrive, before they are spooled to disk."""

    def __init__(self, app: Any, limit: int, file_limit: int, on_reject: Any = None) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.limit:
            if self.on_reject is not None:
                self.on_reject()
            await _error_response(413, "payload_too_large", _too_large_message(self.file_limit))(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "payload_too_large", _too_large_message(self.file_limit))
            return message

        await self.app(scope, limited, send)


# ------------------------------------------------------------------------------------- the app


def create_app(config: ServerConfig, engine_config: EngineConfig | None = None, *, engine: Any | None = None) -> FastAPI:
    """The service as an ASGI app. Pass ``engine`` (prebuilt, e.g. in tests) or ``engine_config``
    (loaded in a background thread at startup)."""
    config = ServerConfig.from_dict(config.to_dict()).validate()  # a checked copy with Path fields
    service = Service(config, engine_config, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="foleyserve",
        summary="HunyuanVideo-Foley as a service: video + text prompt -> 48 kHz Foley audio",
        description=(
            "Upload a video with `POST /v1/generations`, follow the job with `GET /v1/generations/{id}`, "
            "download the result from its `audio_url` / `video_url`. Errors are "
            '`{"error": {"code", "message"}}`. Send `Authorization: Bearer <key>` when the server has an API key.'
        ),
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(
        _BodyLimit, limit=config.max_upload_bytes + FORM_OVERHEAD_BYTES + 8 * config.max_prompt_chars,
        file_limit=config.max_upload_bytes, on_reject=lambda: service.metrics.requests.labels(status="rejected").inc(),
    )
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After", "Location"],
        )
    _add_error_handlers(app, config, service)

    bearer = HTTPBearer(auto_error=False, description="The server's API key, when it has one")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not config.api_key:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            what = "no API key was sent" if not given else "the API key is wrong"
            raise ApiError(401, "unauthorized", f"{what}; send the header 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    def get_record(job_id: str) -> JobRecord:
        rec = service.store.get(job_id) if JOB_ID.match(job_id) else None
        if rec is None:
            raise ApiError(404, "not_found", f"no job with id {job_id[:64]!r}; ids are the 32 hex digits POST /v1/generations returned")
        return rec

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    # -- the page and probes --------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse(
            "<!doctype html><title>foleyserve</title><h1>foleyserve</h1>"
            '<p>The web page is not installed. The API is documented at <a href="docs">/docs</a>.</p>'
        )

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz", response_model=Ready, tags=["operations"], summary="Readiness: the model is loaded",
        responses={503: {"model": ErrorBody, "description": "Still loading, or the model failed to load"}},
    )
    def readyz() -> Any:
        info = service.engine_info()
        if info is None:
            if service.load_error is not None:
                return _error_response(503, "load_failed", "the model failed to load; the server log has the details")
            w = service.warmup
            if w is not None and w.get("done", 0) < w.get("total", 0):
                return _error_response(
                    503, "warming_up",
                    f"compiling the denoiser: bucket {w['done'] + 1} of {w['total']} ({w['current']}); try again shortly",
                    {"Retry-After": "10"},
                )
            return _error_response(503, "not_ready", "the model is loading; try again shortly", {"Retry-After": "5"})
        return {"status": "ready", **info}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response,
             dependencies=[] if config.metrics_public else auth)
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/info", tags=["generations"], summary="Limits and defaults of this server", dependencies=auth, responses=_ERRORS)
    def info() -> dict[str, Any]:
        return {
            "ready": service.ready.is_set(),
            "engine": service.engine_info(),
            "warmup": service.warmup,
            "limits": {
                "max_upload_bytes": config.max_upload_bytes, "max_video_pixels": config.max_video_pixels,
                "max_prompt_chars": config.max_prompt_chars, "steps": [1, config.max_steps], "guidance": [0, 100],
                "seed": [0, MAX_SEED], "wait_seconds": [0, MAX_WAIT_S], "outputs": list(OUTPUTS),
            },
            "defaults": {
                "steps": config.default_steps, "guidance": config.default_guidance, "seed": 0,
                "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "output": "mp4", "priority": config.default_priority,
            },
            "auth": bool(config.api_key),
        }

    # -- generations -----------------------------------------------------------------------------

    @app.post(
        "/v1/generations", status_code=202, response_model=JobBody, tags=["generations"], dependencies=auth,
        summary="Generate Foley for a video",
        responses={
            200: {"model": JobBody, "description": "The job finished within ?wait="},
            413: {"model": ErrorBody, "description": "Upload over the size limit"},
            415: {"model": ErrorBody, "description": "The upload is not a video"},
            422: {"model": ErrorBody, "description": "Corrupt or too-short video, or a parameter out of range"},
            429: {"model": ErrorBody, "description": "Queue full; see Retry-After"},
            503: {"model": ErrorBody, "description": "The model is still loading"},
            401: _ERRORS[401],
        },
    )
    async def submit(
        request: Request,
        response: Response,
        video: UploadFile = File(description="The video (MP4, MOV, MKV, WebM...); the model uses at most its first 15 s"),
        prompt: str = Form("", max_length=config.max_prompt_chars, description="What the scene should sound like"),
        negative_prompt: str = Form(DEFAULT_NEGATIVE_PROMPT, max_length=config.max_prompt_chars, description="What to avoid"),
        steps: int = Form(config.default_steps, ge=1, le=config.max_steps, description="Denoising steps (cost grows with it)"),
        guidance: float = Form(config.default_guidance, ge=0.0, le=100.0, description="Classifier-free guidance scale"),
        seed: int = Form(0, ge=0, le=MAX_SEED, description="Random seed: the same seed and inputs give the same audio"),
        output: Literal["mp4", "wav", "flac"] = Form("mp4", description="mp4 (the video with the new sound), wav or flac"),
        priority: Literal["interactive", "bulk"] | None = Form(None, description=f"Queue class (default {config.default_priority})"),
        keep_original_audio: float | None = Form(None, ge=0.0, le=4.0, description="Mix the video's own sound under the Foley at this gain (mp4 only)"),
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S, description="Seconds to wait for the job to end before answering (0: answer at once)"),
    ) -> Any:
        form = await request.form()
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown form field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FORM_FIELDS)}")
        if keep_original_audio is not None and output != "mp4":
            raise ApiError(422, "invalid_parameter", "keep_original_audio applies to output=mp4 only; drop it or ask for mp4")
        if not service.ready.is_set() or service.batcher is None:
            if service.load_error is not None:
                raise ApiError(503, "load_failed", "the model failed to load, so no job can run; the server log has the details")
            raise ApiError(503, "not_ready", "the model is still loading; try again shortly", {"Retry-After": "5"})
        store = service.store
        job_id = uuid.uuid4().hex
        upload = store.upload_path(job_id)
        params = {
            "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
            "seed": seed, "output": output, "keep_original_audio": keep_original_audio,
        }
        rec = JobRecord(id=job_id, status="queued", priority=priority or config.default_priority, params=params,
                        created=time.time(), upload=upload.name)
        try:
            size = await run_in_threadpool(_save_upload, video.file, upload, config.max_upload_bytes)
            await run_in_threadpool(inspect_upload, upload, config, video.filename)
            req = service._request_for(rec, upload)
            try:
                req.validate()
            except RequestError as e:
                raise ApiError(422, "invalid_parameter", str(e)) from None
            store.add(rec)
            try:
                await run_in_threadpool(service.batcher.submit, req, priority=rec.priority, job_id=job_id)
            except Exception as e:
                store.delete(job_id)
                raise _submit_error(e) from None
        except BaseException:
            _unlink(upload)
            raise
        service.metrics.upload_bytes.inc(size)
        if wait > 0:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                current = store.get(job_id)
                if current is None or current.is_final:
                    break
                await asyncio.sleep(WAIT_POLL_S)
        current = store.get(job_id) or rec
        response.headers["Location"] = f"{root(request)}/v1/generations/{job_id}"
        if current.is_final:
            response.status_code = 200
        return service.body(current, root(request))

    @app.get("/v1/generations", response_model=JobList, tags=["generations"], dependencies=auth,
             summary="Recent jobs, newest first", responses={401: _ERRORS[401]})
    def recent(request: Request, limit: int = Query(20, ge=1, le=100, description="How many jobs")) -> dict[str, Any]:
        return {"items": [service.body(r, root(request)) for r in service.store.recent(limit)]}

    @app.get("/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
             summary="A job's status, progress and result links", responses=_ERRORS)
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return service.body(get_record(job_id), root(request))

    @app.delete("/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
                summary="Cancel a job (a running job stops at its next denoising step)", responses=_ERRORS)
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        rec = get_record(job_id)
        if not rec.is_final:
            service.cancel(job_id)
            rec = service.store.get(job_id) or rec
        return service.body(rec, root(request))

    def download(job_id: str, kind: str) -> FileResponse:
        rec = get_record(job_id)
        if rec.status in ACTIVE_STATUSES:
            raise ApiError(409, "not_finished", f"the job is {rec.status}; poll GET /v1/generations/{job_id} until its status is succeeded")
        if rec.status != "succeeded":
            raise ApiError(404, "not_available", f"the job {rec.status}, so it has no result")
        if rec.expired is not None:
            raise ApiError(410, "expired", "this job's result files were deleted by the server's retention policy; submit the job again")
        name = rec.files.get(kind)
        if name is None:
            raise ApiError(404, "not_available", f"this job's output is {rec.params['output']}, so there is no video; ask for output=mp4 to get one")
        path = service.store.result_path(name)
        if not path.is_file():
            raise ApiError(410, "expired", "this job's result file is no longer on the server; submit the job again")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=f"foley-{job_id[:8]}{path.suffix}")

    file_responses = {**_ERRORS, 409: {"model": ErrorBody, "description": "Not finished yet"},
                      410: {"model": ErrorBody, "description": "Deleted by retention"}}

    @app.get("/v1/generations/{job_id}/audio", tags=["generations"], dependencies=auth, response_class=FileResponse,
             summary="The result audio: wav, or flac when the job asked for flac", responses=file_responses)
    def audio(job_id: str) -> FileResponse:
        return download(job_id, "audio")

    @app.get("/v1/generations/{job_id}/video", tags=["generations"], dependencies=auth, response_class=FileResponse,
             summary="The mp4 with the new sound (output=mp4 jobs)", responses=file_responses)
    def video_file(job_id: str) -> FileResponse:
        return download(job_id, "video")

    return app


def _submit_error(e: Exception) -> ApiError:
    from foleyserve.runtime.batcher import QueueFull

    if isinstance(e, QueueFull):
        retry = max(1, math.ceil(float(getattr(e, "retry_after", 1.0) or 1.0)))
        return ApiError(429, "queue_full", f"the queue is full; retry in about {retry} s", {"Retry-After": str(retry)})
    if isinstance(e, RequestError):
        return ApiError(422, "invalid_parameter", str(e))
    if isinstance(e, media.MediaError):
        return ApiError(422, "invalid_video", str(e))
    log.error("submitting a job failed:\n%s", "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return ApiError(500, "internal_error", "the job could not be queued because of an internal error; the server log has the details")


def _version() -> str:
    from foleyserve import __version__

    return __version__


# ---------------------------------------------------------------------------------- error handlers


def _param_rules(config: ServerConfig) -> dict[str, str]:
    return {
        "video": "a video file in the multipart file field 'video'",
        "prompt": f"text of at most {config.max_prompt_chars} characters",
        "negative_prompt": f"text of at most {config.max_prompt_chars} characters",
        "steps": f"an integer from 1 to {config.max_steps}",
        "guidance": "a number from 0 to 100",
        "seed": f"an integer from 0 to {MAX_SEED}",
        "output": "one of mp4, wav, flac",
        "priority": "interactive or bulk",
        "keep_original_audio": "a number from 0 to 4 (mp4 output only)",
        "wait": f"a number of seconds from 0 to {MAX_WAIT_S:g}",
        "limit": "an integer from 1 to 100",
    }


def _validation_message(errors: list[dict[str, Any]], rules: dict[str, str]) -> str:
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        name = loc[0] if loc else "request"
        rule = rules.get(name)
        if err.get("type") == "missing":
            parts.append(f"{name} is required: send {rule}" if rule else f"{name} is required")
            continue
        given = err.get("input")
        shown = repr(given if not isinstance(given, str) else given[:40] + ("..." if len(given) > 40 else ""))
        if rule:
            parts.append(f"{name} must be {rule}, got {shown}")
        else:
            parts.append(f"{name}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "the request is invalid"


def _is_submission(request: Request) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/v1/generations")


def _add_error_handlers(app: FastAPI, config: ServerConfig, service: Service) -> None:
    rules = _param_rules(config)

    def count_rejected(request: Request, status: int) -> None:
        if _is_submission(request) and 400 <= status < 500 and status != 401:
            service.metrics.requests.labels(status="rejected").inc()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count_rejected(request, exc.status_code)
        if isinstance(exc, ApiError):
            return _error_response(exc.status_code, exc.code, str(exc.detail), exc.headers)
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            detail = "no such route; the API is documented at /docs"
        elif exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed; send multipart/form-data with the video in the 'video' field"
        return _error_response(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_rejected(request, 422)
        return _error_response(422, "invalid_parameter", _validation_message(list(exc.errors()), rules))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return _error_response(500, "internal_error", "internal server error; the server log has the details")
