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
import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from foleyserve.config import EngineConfig
from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT, RequestError
from foleyserve.server.errors import MAX_SEED, MAX_WAIT_S, ApiError, add_error_handlers, error_response, submit_error
from foleyserve.server.jobs import ACTIVE_STATUSES, JobRecord
from foleyserve.server.prometheus import CONTENT_TYPE
from foleyserve.server.schemas import ERROR_RESPONSES, ErrorBody, Health, JobBody, JobList, Ready
from foleyserve.server.service import Service, unlink
from foleyserve.server.settings import ServerConfig
from foleyserve.server.uploads import BodyLimit, inspect_upload, save_upload

log = logging.getLogger("foleyserve.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUTS = ("mp4", "wav", "flac")
WAIT_POLL_S = 0.05
# Room for the multipart framing and the text fields on top of the video itself.
FORM_OVERHEAD_BYTES = 256 * 1024
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp4": "video/mp4"}
FORM_FIELDS = ("video", "prompt", "negative_prompt", "steps", "guidance", "seed", "output", "priority", "keep_original_audio")


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
        BodyLimit, limit=config.max_upload_bytes + FORM_OVERHEAD_BYTES + 8 * config.max_prompt_chars,
        file_limit=config.max_upload_bytes, on_reject=lambda: service.metrics.requests.labels(status="rejected").inc(),
    )
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After", "Location"],
        )
    add_error_handlers(app, config, lambda: service.metrics.requests.labels(status="rejected").inc())

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
                return error_response(503, "load_failed", "the model failed to load; the server log has the details")
            w = service.warmup
            if w is not None and w.get("done", 0) < w.get("total", 0):
                return error_response(
                    503, "warming_up",
                    f"compiling the denoiser: bucket {w['done'] + 1} of {w['total']} ({w['current']}); try again shortly",
                    {"Retry-After": "10"},
                )
            return error_response(503, "not_ready", "the model is loading; try again shortly", {"Retry-After": "5"})
        return {"status": "ready", **info}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response,
             dependencies=[] if config.metrics_public else auth)
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/info", tags=["generations"], summary="Limits and defaults of this server", dependencies=auth, responses=ERROR_RESPONSES)
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
            401: ERROR_RESPONSES[401],
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
            size = await run_in_threadpool(save_upload, video.file, upload, config.max_upload_bytes)
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
                raise submit_error(e) from None
        except BaseException:
            unlink(upload)
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
             summary="Recent jobs, newest first", responses={401: ERROR_RESPONSES[401]})
    def recent(request: Request, limit: int = Query(20, ge=1, le=100, description="How many jobs")) -> dict[str, Any]:
        return {"items": [service.body(r, root(request)) for r in service.store.recent(limit)]}

    @app.get("/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
             summary="A job's status, progress and result links", responses=ERROR_RESPONSES)
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return service.body(get_record(job_id), root(request))

    @app.delete("/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
                summary="Cancel a job (a running job stops at its next denoising step)", responses=ERROR_RESPONSES)
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

    file_responses = {**ERROR_RESPONSES, 409: {"model": ErrorBody, "description": "Not finished yet"},
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


def _version() -> str:
    from foleyserve import __version__

    return __version__


