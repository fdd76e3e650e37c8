"""Who may submit, and whether the server can take the job now: decided from the request's
headers alone, so that a refusal costs the client no upload (see :class:`AdmissionGate`)."""

from __future__ import annotations

import hmac
import math
import re
from typing import TYPE_CHECKING

from fastapi import Request

from foleyserve.server.errors import ApiError
from foleyserve.server.settings import ServerConfig
from foleyserve.server.storage import describe_storage_error, is_storage_error
from foleyserve.server.uploads import header

if TYPE_CHECKING:
    from foleyserve.server.service import Service

CLIENT_ID_HEADER = "X-Client-Id"
# A client id is an opaque token (the web page sends a random UUID); anything else is ignored.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")


def key_refusal(authorization: str | None, config: ServerConfig) -> ApiError | None:
    """401 when the server has an API key and the Authorization header does not carry it."""
    if not config.api_key:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if hmac.compare_digest(given.encode(), config.api_key.encode()):
        return None
    what = "no API key was sent" if not given else "the API key is wrong"
    return ApiError(401, "unauthorized", f"{what}; send the header 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"})


def admission_refusal(scope: dict, config: ServerConfig, service: "Service") -> ApiError | None:
    """Why a submission cannot be taken now, from its headers: wrong key, model not ready, disk
    full, queue full. None for any request that is not a submission."""
    path = str(scope.get("path", "")).rstrip("/")
    if scope.get("method") != "POST" or not path.endswith("/v1/generations"):
        return None
    refusal = key_refusal(header(scope, b"authorization"), config)
    if refusal is not None:
        return refusal
    batcher = service.batcher
    if not service.ready.is_set() or batcher is None:
        if service.load_error is not None:
            return ApiError(503, "load_failed", "the model failed to load, so no job can run; the server log has the details")
        return ApiError(503, "not_ready", "the model is still loading; try again shortly", {"Retry-After": "5"})
    problem = service.storage.problem()
    if problem is not None:
        return ApiError(507, "insufficient_storage", problem, {"Retry-After": "60"})
    depth = batcher.queue_depth()
    if depth >= config.max_queue:
        retry = max(1, math.ceil(batcher.retry_after()))
        return ApiError(
            429, "queue_full",
            f"the queue is full ({depth} jobs waiting, limit {config.max_queue}); retry in about {retry} s",
            {"Retry-After": str(retry)},
        )
    return None


def client_id(request: Request) -> str | None:
    """The caller's X-Client-Id when it is a well-formed token; listing jobs shows only its own."""
    value = request.headers.get(CLIENT_ID_HEADER)
    return value if value is not None and _CLIENT_ID.match(value) else None


def storage_refusal(exc: Exception, service: "Service") -> Exception:
    """507 for a write the disk refused (and note it for /readyz); other errors unchanged."""
    if not is_storage_error(exc):
        return exc
    service.storage.write_failed(exc)
    return ApiError(507, "insufficient_storage", f"the job could not be recorded: {describe_storage_error(exc)}; try again later")
