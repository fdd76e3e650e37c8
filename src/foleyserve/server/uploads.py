"""Upload inspection: save an upload within its size limit, tell a broken video from no video,
and refuse oversized request bodies while they arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import av

from foleyserve import media
from foleyserve.server.errors import ApiError, error_response
from foleyserve.server.forms import too_large_message
from foleyserve.server.settings import ServerConfig

# A clip needs 16 frames at 25 fps; refuse at upload only when the header is clearly shorter, the
# decoder makes the exact call (a header can undercount).
MIN_HEADER_SECONDS = 0.6

_VIDEO_MAGIC_AT_4 = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


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
        kind = media.describe_non_video(head)
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
        kind = media.describe_non_video(head) or f"a still image ({info.container.removesuffix('_pipe')})"
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


class AdmissionGate:
    """Decide a submission from its headers before any of its body is read.

    The API key, the declared size, readiness, the data directory's health and the queue are all
    known before the first body byte arrives, so a refused client never uploads (up to 200 MiB)
    only to be told no; a client that sends ``Expect: 100-continue`` (curl does for large files)
    sends nothing at all. Bodies that arrive are still counted against the limit as they stream.
    """

    def __init__(self, app: Any, *, limit: int, file_limit: int, check: Callable[[dict], ApiError | None],
                 on_reject: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit
        self.check = check
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is None:
            length = _content_length(scope)
            if length is not None and length > self.limit:
                refusal = ApiError(413, "payload_too_large", too_large_message(self.file_limit))
        if refusal is not None:
            if self.on_reject is not None:
                self.on_reject(refusal.status_code)
            headers = dict(refusal.headers or {})
            # The body was not read: the connection cannot be reused for another request.
            headers["Connection"] = "close"
            await error_response(refusal.status_code, refusal.code, str(refusal.detail), headers)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "payload_too_large", too_large_message(self.file_limit))
            return message

        await self.app(scope, limited, send)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def header(scope: dict, name: bytes) -> str | None:
    """A request header from an ASGI scope (latin-1, as HTTP defines), or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
