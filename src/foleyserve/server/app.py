"""The HTTP service: a FastAPI app around one engine, one batcher, one cache and one job store.

    POST   /v1/generations            upload a video (or none + duration: text to audio) -> 202 job
                                      (or 200 when ?wait= saw it finish); num_samples: several seeds
    GET    /v1/generations            recent jobs
    GET    /v1/generations/{id}       status, progress, timings, error
    DELETE /v1/generations/{id}       cancel (finished: delete the result files)
    GET    /v1/generations/{id}/audio the result audio (wav, or flac when asked for); ?seed=S: that sample
    GET    /v1/generations/{id}/video the mp4 with the new sound (output=mp4 only); ?seed=S likewise
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
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from foleyserve.config import EngineConfig
from foleyserve.pipeline.pipeline import MAX_SECONDS
from foleyserve.loudness import DEFAULT_TRUE_PEAK_DBTP, MAX_TARGET_LUFS, MIN_TARGET_LUFS
from foleyserve.pipeline.requests import BIT_DEPTHS, DEFAULT_LOUDNESS, DEFAULT_NEGATIVE_PROMPT, TEXT_ONLY_SECONDS, RequestError
from foleyserve.server.admission import CLIENT_ID_HEADER, admission_refusal, client_id, key_refusal, storage_refusal
from foleyserve.server.docs import mount_docs
from foleyserve.server.errors import (
    MAX_SEED, MAX_WAIT_S, ApiError, add_error_handlers, error_response, param_rules, submit_error, validation_message,
)
from foleyserve.server.forms import (
    BEST_OF, DEFAULT_RANK, NUM_SAMPLES, RANK_MEASURES, check_text_only, form_model, openapi_request_body, parse_fields,
    receive_form, resolve_best_of,
)
from foleyserve.server.jobs import ACTIVE_STATUSES, DuplicateJob, JobRecord
from foleyserve.server.prometheus import CONTENT_TYPE
from foleyserve.server.results import file_key, rank_of, seeds_of
from foleyserve.server.schemas import ERROR_RESPONSES, ErrorBody, Health, JobBody, JobList, Ready
from foleyserve.server.service import Service, unlink
from foleyserve.server.settings import ServerConfig
from foleyserve.server.uploads import AdmissionGate, inspect_upload

log = logging.getLogger("foleyserve.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUTS = ("mp4", "wav", "flac")
WAIT_POLL_S = 0.05
# Room for the multipart framing and the text fields on top of the video itself.
FORM_OVERHEAD_BYTES = 256 * 1024
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp4": "video/mp4"}
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


# ------------------------------------------------------------------------------------- the app


def create_app(
    config: ServerConfig, engine_config: EngineConfig | None = None, *, engine: Any | None = None,
    service_factory: Callable[..., Service] = Service,
) -> FastAPI:
    """The service as an ASGI app. Pass ``engine`` (prebuilt, e.g. in tests) or ``engine_config``
    (loaded in a background thread at startup). ``service_factory(config, engine_config, engine)``
    builds the state behind the routes: the Ray Serve ingress passes one whose jobs run on the
    engine replicas (server/ray_app.py), so both share these routes."""
    config = ServerConfig.from_dict(config.to_dict()).validate()  # a checked copy with Path fields
    service = service_factory(config, engine_config, engine)

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
            "Upload a video with `POST /v1/generations` (or leave it out and send `duration` for text to audio; "
            "`num_samples` makes several seeds at once), follow the job with `GET /v1/generations/{id}`, "
            "download the result from its `audio_url` / `video_url` (each sample's from `results`). Errors are "
            '`{"error": {"code", "message"}}`. Send `Authorization: Bearer <key>` when the server has an API key.'
        ),
        version=_version(),
        lifespan=lifespan,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN (blank offline); ours ship them.
        docs_url=None,
        redoc_url=None,
    )
    mount_docs(app)
    app.state.service = service
    app.add_middleware(
        AdmissionGate, limit=config.max_upload_bytes + FORM_OVERHEAD_BYTES + 8 * config.max_prompt_chars,
        file_limit=config.max_upload_bytes, check=lambda scope: admission_refusal(scope, config, service),
        on_reject=lambda status: status != 401 and service.metrics.requests.labels(status="rejected").inc(),
    )
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", CLIENT_ID_HEADER, IDEMPOTENCY_HEADER],
            expose_headers=["Retry-After", "Location", "Idempotent-Replayed"],
        )
    add_error_handlers(app, config, lambda: service.metrics.requests.labels(status="rejected").inc())

    bearer = HTTPBearer(auto_error=False, description="The server's API key, when it has one")

    def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        refusal = key_refusal(request.headers.get("authorization"), config)
        if refusal is not None:
            raise refusal

    auth = [Depends(require_key)]

    def get_record(job_id: str) -> JobRecord:
        rec = service.record(job_id) if JOB_ID.match(job_id) else None
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

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, tags=["operations"],
             summary="Liveness: the process answers (and how its data directory is); HEAD too")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "storage": service.storage.problem() or "ok", "replicas": service.replicas()}

    @app.head("/readyz", include_in_schema=False)
    @app.get(
        "/readyz", response_model=Ready, response_model_exclude_none=True, tags=["operations"],
        summary="Readiness: the model is loaded and the data directory takes writes; HEAD too",
        responses={503: {"model": ErrorBody, "description": "Still loading, the model failed to load, or the disk refuses writes"}},
    )
    def readyz() -> Any:
        info = service.engine_info()
        problem = service.storage.problem()
        if info is not None and problem is not None:
            return error_response(503, "storage_unavailable", problem, {"Retry-After": "30"})
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
        return {"status": "ready", **info, "replicas": service.replicas()}

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
                # Seconds of video that get sound: null, all of it (longer clips run in windows of at
                # most 15 s, joined by crossfades; the page states no limit).
                "max_video_seconds": None,
                "window_seconds": MAX_SECONDS,
                "loudness": [MIN_TARGET_LUFS, MAX_TARGET_LUFS], "bit_depths": list(BIT_DEPTHS),
                "num_samples": list(NUM_SAMPLES),
                # best_of: num_samples plus a ranking by these measures (DeSync needs 4.8 s of video).
                "best_of": list(BEST_OF), "rank_measures": list(RANK_MEASURES),
                # Text to audio (no video): duration is the audio's length, output wav or flac.
                "text_only_seconds": list(TEXT_ONLY_SECONDS), "text_only_outputs": ["wav", "flac"],
            },
            "defaults": {
                "steps": config.default_steps, "guidance": config.default_guidance, "seed": 0,
                "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "output": "mp4", "priority": config.default_priority,
                # LUFS (loudness=off: the raw model output); the true peak is a fixed ceiling in dBTP.
                "loudness": DEFAULT_LOUDNESS, "true_peak": DEFAULT_TRUE_PEAK_DBTP, "bit_depth": None,
                "num_samples": 1, "text_only_output": "wav", "best_of": None, "rank": DEFAULT_RANK,
            },
            "auth": bool(config.api_key),
            # The web page warns before the first run that the demo model's audio is noise.
            "demo": service.is_demo(),
            # Scaled out on Ray Serve: the engine replicas and their state; null on one process.
            "replicas": service.replicas(),
        }

    # -- generations -----------------------------------------------------------------------------

    fields_model = form_model(config)

    @app.post(
        "/v1/generations", status_code=202, response_model=JobBody, tags=["generations"], dependencies=auth,
        summary="Generate Foley for a video, or audio from text alone",
        description=(
            "multipart/form-data. With a `video` part: Foley for the video (`start`/`duration` pick a range). Without "
            f"one: text to audio, and `duration` ({TEXT_ONLY_SECONDS[0]:g}-{TEXT_ONLY_SECONDS[1]:g} s) is the length "
            "of the audio; output is wav (default) or flac, and `keep_original_audio` and `start` do not apply. "
            f"`num_samples` ({NUM_SAMPLES[0]}-{NUM_SAMPLES[1]}) makes one sample per seed `seed` .. `seed + num_samples - 1` "
            "in one denoising batch; the job's `results` lists them and `GET .../audio?seed=S` downloads one. Only "
            "one-sample jobs are answered from the result cache. `best_of` (2-8) is `num_samples` plus a ranking by "
            "`rank` (default desync,clap): the job's `candidates` carry each one's scores, best first, and "
            "`audio_url`/`video_url` are the best one's."
        ),
        openapi_extra={"requestBody": openapi_request_body(fields_model)},
        responses={
            200: {"model": JobBody, "description": "The job finished within ?wait="},
            400: {"model": ErrorBody, "description": "The multipart body was cut short"},
            413: {"model": ErrorBody, "description": "Upload over the size limit"},
            415: {"model": ErrorBody, "description": "The upload is not a video, or the body is not multipart/form-data"},
            422: {"model": ErrorBody, "description": "Corrupt or too-short video, no video and no duration, a parameter out of range (num_samples 1-8, best_of 2-8 and not with num_samples, rank; without a video duration 0.64-15 and no mp4), a repeated, empty or non-UTF-8 field, or a prompt over CLAP's token limit"},
            429: {"model": ErrorBody, "description": "Queue full; Retry-After says when a slot is expected"},
            503: {"model": ErrorBody, "description": "The model is still loading"},
            507: {"model": ErrorBody, "description": "The server's disk is full or read-only"},
            401: ERROR_RESPONSES[401],
        },
    )
    async def submit(
        request: Request,
        response: Response,
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S, description="Seconds to wait for the job to end before answering (0: answer at once)"),
    ) -> Any:
        refusal = admission_refusal(request.scope, config, service)
        if refusal is not None:
            raise refusal
        store, batcher = service.store, service.batcher
        key = idempotency_key(request)
        owner = client_id(request)
        if key is not None:
            # A retry of a submission that got through: its job, without reading the upload again.
            earlier = await run_in_threadpool(store.find_by_key, key, owner)
            if earlier is not None:
                return _repeat(response, service, earlier, root(request))
        job_id = uuid.uuid4().hex
        upload = store.upload_path(job_id)
        try:
            form = await receive_form(
                request.headers.get("content-type", ""), request.stream(), upload,
                max_file_bytes=config.max_upload_bytes, max_text_bytes=4 * config.max_prompt_chars + 64,
            )
            try:
                fields = parse_fields(fields_model, form.fields)
            except ValidationError as e:
                rules = {**param_rules(config), "num_samples": f"an integer from {NUM_SAMPLES[0]} to {NUM_SAMPLES[1]}",
                         "best_of": f"an integer from {BEST_OF[0]} to {BEST_OF[1]}"}
                raise ApiError(422, "invalid_parameter", validation_message(list(e.errors()), rules)) from None
            params = fields.model_dump()
            resolve_best_of(params, form.fields)
            params["text_only"] = not form.has_video
            if params["text_only"]:
                check_text_only(params)
            params["output"] = params["output"] or "mp4"
            if params["keep_original_audio"] is not None and params["output"] != "mp4":
                raise ApiError(422, "invalid_parameter", "keep_original_audio applies to output=mp4 only; drop it or ask for mp4")
            if params["seed"] + params["num_samples"] - 1 > MAX_SEED:
                raise ApiError(422, "invalid_parameter", f"seed + num_samples - 1 must be at most {MAX_SEED}; choose a smaller seed")
            priority = params.pop("priority") or config.default_priority
            rec = JobRecord(id=job_id, status="queued", priority=priority, params=params, created=time.time(),
                            upload=None if params["text_only"] else upload.name, owner=owner, idempotency_key=key)
            await run_in_threadpool(service.check_prompts, params["prompt"], params["negative_prompt"])
            if form.has_video:
                await run_in_threadpool(inspect_upload, upload, config, form.filename)
            req = service._request_for(rec, upload)
            try:
                req.validate()
            except RequestError as e:
                raise ApiError(422, "invalid_parameter", str(e)) from None
            try:
                store.add(rec)
            except DuplicateJob as e:
                # The same key raced in from a concurrent retry, which won.
                unlink(upload)
                return _repeat(response, service, e.existing, root(request))
            except Exception as e:
                raise storage_refusal(e, service) from None
            try:
                await run_in_threadpool(batcher.submit, req, priority=rec.priority, job_id=job_id, seeds=seeds_of(params),
                                        rank=rank_of(params))
            except Exception as e:
                store.delete(job_id)
                raise submit_error(e) from None
        except BaseException:
            unlink(upload)
            raise
        service.metrics.upload_bytes.inc(form.video_bytes)
        if wait > 0:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                current = service.record(job_id)
                if current is None or current.is_final:
                    break
                await asyncio.sleep(WAIT_POLL_S)
        current = service.record(job_id) or rec
        response.headers["Location"] = f"{root(request)}/v1/generations/{job_id}"
        if current.is_final:
            response.status_code = 200
        return service.body(current, root(request))

    @app.get("/v1/generations", response_model=JobList, tags=["generations"], dependencies=auth,
             summary="Recent jobs, newest first", responses={401: ERROR_RESPONSES[401]})
    def recent(request: Request, limit: int = Query(20, ge=1, le=100, description="How many jobs")) -> dict[str, Any]:
        return {"items": [service.body(r, root(request)) for r in service.recent(limit, client_id(request))]}

    @app.get("/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
             summary="A job's status, progress and result links", responses=ERROR_RESPONSES)
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return service.body(get_record(job_id), root(request))

    @app.delete(
        "/v1/generations/{job_id}", response_model=JobBody, tags=["generations"], dependencies=auth,
        summary="Cancel a job, or delete a finished job's result files",
        description=(
            "A queued, preparing or running job is cancelled (a running job stops at its next denoising step). "
            "A finished job's result files are deleted at once; its record stays, with `expired: true`, and its "
            "downloads answer 410. Deleting again changes nothing."
        ),
        responses=ERROR_RESPONSES,
    )
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        rec = get_record(job_id)
        if not rec.is_final:
            service.cancel(job_id)
            rec = service.record(job_id) or rec
        if rec.is_final:
            rec = service.delete_results(rec)
        return service.body(rec, root(request))

    def download(job_id: str, kind: str, seed: int | None) -> FileResponse:
        rec = get_record(job_id)
        if rec.status in ACTIVE_STATUSES:
            raise ApiError(409, "not_finished", f"the job is {rec.status}; poll GET /v1/generations/{job_id} until its status is succeeded")
        if rec.status != "succeeded":
            raise ApiError(404, "not_available", f"the job {rec.status}, so it has no result")
        if rec.expired is not None:
            raise ApiError(410, "expired", "this job's result files were deleted (by a DELETE or the server's retention policy); submit the job again")
        key = file_key(rec, kind, seed)
        if key is None or (key != kind and f"audio@{seed}" not in rec.files):  # no sample with that seed
            seeds = seeds_of(rec.params) or [rec.params["seed"]]
            raise ApiError(404, "not_available", f"this job has no sample with seed {seed}; its seeds are {', '.join(map(str, seeds))}")
        name = rec.files.get(key)
        if name is None:
            raise ApiError(404, "not_available", f"this job's output is {rec.params['output']}, so there is no video; ask for output=mp4 to get one")
        path = service.store.result_path(name)
        damage = service.verifier.check(path, rec.checksums.get(name))
        if damage == "missing":
            raise ApiError(410, "expired", "this job's result file is no longer on the server; submit the job again")
        if damage is not None:
            log.error("job %s: result file %s is %s; not served", job_id, name, damage)
            raise ApiError(410, "result_damaged", f"this job's result file on the server is {damage}, so it is not served; submit the job again")
        label = f"-seed{seed}" if key != kind else ""
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=f"foley-{job_id[:8]}{label}{path.suffix}")

    file_responses = {**ERROR_RESPONSES, 409: {"model": ErrorBody, "description": "Not finished yet"},
                      410: {"model": ErrorBody, "description": "Deleted (DELETE or retention), or damaged on the server's disk"}}

    seed_query = Query(None, ge=0, le=MAX_SEED, description=(
        "Which sample of a num_samples job (one of its results' seeds); default: the first (best_of: the kept one)"))

    @app.get("/v1/generations/{job_id}/audio", tags=["generations"], dependencies=auth, response_class=FileResponse,
             summary="The result audio: wav, or flac when the job asked for flac", responses=file_responses)
    def audio(job_id: str, seed: int | None = seed_query) -> FileResponse:
        return download(job_id, "audio", seed)

    @app.get("/v1/generations/{job_id}/video", tags=["generations"], dependencies=auth, response_class=FileResponse,
             summary="The mp4 with the new sound (output=mp4 jobs)", responses=file_responses)
    def video_file(job_id: str, seed: int | None = seed_query) -> FileResponse:
        return download(job_id, "video", seed)

    return app


def idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header (a retried submission with the same key and client id gets the
    first job back), checked; 422 for a malformed one."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.match(value):
        raise ApiError(422, "invalid_parameter",
                       f"{IDEMPOTENCY_HEADER} must be 1-255 printable ASCII characters (a UUID is a good choice)")
    return value


def _repeat(response: Response, service: Service, rec: JobRecord, root: str) -> dict[str, Any]:
    """The answer to a repeated submission: the first job's body (200 once it has ended)."""
    response.headers["Location"] = f"{root}/v1/generations/{rec.id}"
    response.headers["Idempotent-Replayed"] = "true"
    rec = service.record(rec.id) or rec
    if rec.is_final:
        response.status_code = 200
    return service.body(rec, root)


def _version() -> str:
    from foleyserve import __version__

    return __version__


