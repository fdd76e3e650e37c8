"""Error answers: one JSON shape for every refusal, and the handlers that make sure of it.

Every error leaves the service as ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx
status; ``code`` is stable for programs, ``message`` says what went wrong and what to do. No
traceback ever leaves the process: unexpected exceptions are logged and answered with a generic 500.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from foleyserve import media
from foleyserve.loudness import MAX_TARGET_LUFS, MIN_TARGET_LUFS
from foleyserve.pipeline.requests import RequestError
from foleyserve.server.settings import ServerConfig

log = logging.getLogger("foleyserve.server")

MAX_SEED = 2**63 - 1
MAX_WAIT_S = 600.0

class ApiError(HTTPException):
    """An error answer with a stable machine-readable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 410: "expired", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "invalid_parameter", 429: "queue_full", 503: "not_ready", 507: "insufficient_storage",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)



def submit_error(e: Exception) -> ApiError:
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


def param_rules(config: ServerConfig) -> dict[str, str]:
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
        "loudness": f"a target in LUFS from {MIN_TARGET_LUFS:g} to {MAX_TARGET_LUFS:g}, or off",
        "bit_depth": "16 or 24 (wav and flac output only)",
        "wait": f"a number of seconds from 0 to {MAX_WAIT_S:g}",
        "limit": "an integer from 1 to 100",
    }


def validation_message(errors: list[dict[str, Any]], rules: dict[str, str]) -> str:
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


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(scope)[0] != Match.NONE:
            methods |= set(route_methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _is_submission(request: Request) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/v1/generations")


def add_error_handlers(app: FastAPI, config: ServerConfig, on_rejected: Callable[[], None]) -> None:
    """Map every exception a route can raise to the one error shape; ``on_rejected`` counts
    refused submissions (a 4xx other than 401) for the metrics."""
    rules = param_rules(config)

    def count_rejected(request: Request, status: int) -> None:
        if _is_submission(request) and 400 <= status < 500 and status != 401:
            on_rejected()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count_rejected(request, exc.status_code)
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.code, str(exc.detail), exc.headers)
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            detail = "no such route; the API is documented at /docs"
        elif exc.status_code == 405:
            allowed = allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            detail = f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}"
        elif exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed; send multipart/form-data with the video in the 'video' field"
        return error_response(exc.status_code, code, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_rejected(request, 422)
        return error_response(422, "invalid_parameter", validation_message(list(exc.errors()), rules))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Routine (a closed tab, a dropped mobile link): the upload is already removed, and
        # nobody is left to read an answer.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return error_response(500, "internal_error", "internal server error; the server log has the details")

