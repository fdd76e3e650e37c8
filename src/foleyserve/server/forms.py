"""The submission form, parsed strictly while it streams in.

``POST /v1/generations`` takes ``multipart/form-data``. Starlette's form parser is lenient in
ways that hide client bugs: a repeated field silently wins, an empty ``steps=`` means the
default, invalid UTF-8 is decoded as Latin-1, and a body cut off before its closing boundary is
accepted. It also spools the video to a temporary file that then has to be copied. This parser
writes the video straight to its upload path with the size limit enforced per chunk, and refuses
each of those ambiguities with a message that names the field and the fix.

The text fields are then checked by a pydantic model built from the server's limits
(:func:`form_model`), which is also what the OpenAPI schema of the endpoint shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from foleyserve.loudness import DEFAULT_TRUE_PEAK_DBTP, MAX_TARGET_LUFS, MIN_TARGET_LUFS
from foleyserve.pipeline.requests import DEFAULT_LOUDNESS, DEFAULT_NEGATIVE_PROMPT, TEXT_ONLY_SECONDS
from foleyserve.server.errors import MAX_SEED, ApiError
from foleyserve.server.settings import ServerConfig
from foleyserve.server.storage import describe_storage_error, is_storage_error

FILE_FIELD = "video"
TEXT_FIELDS = (
    "prompt", "negative_prompt", "steps", "guidance", "seed", "output", "priority", "keep_original_audio", "loudness", "bit_depth",
    "start", "duration", "num_samples", "best_of", "rank",
)
# Samples of one submission (seeds seed .. seed + N - 1), run as rows of one denoising loop.
NUM_SAMPLES = (1, 8)
# best_of N is num_samples N plus a ranking: one candidate cannot be ranked against anything.
BEST_OF = (2, 8)
DEFAULT_RANK = "desync,clap"
RANK_MEASURES = ("desync", "clap")
# Fields where an empty value is a real value (an empty prompt is allowed); for the others an
# empty value is a client bug that used to mean "the default".
EMPTY_ALLOWED = ("prompt", "negative_prompt")
MAX_PARTS = len(TEXT_FIELDS) + 1


@dataclass
class ReceivedForm:
    """What a submission carried: its text fields, and where its video went."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    video_bytes: int = 0
    has_video: bool = False


def too_large_message(limit: int) -> str:
    return (
        f"the upload is larger than this server's limit of {limit / 2**20:.3g} MiB; send a shorter or more "
        f"compressed clip (the model uses at most the first 15 s)"
    )


class _Receiver:
    """Callbacks for python-multipart's streaming parser (it calls them synchronously)."""

    def __init__(self, dest: Path, max_file_bytes: int, max_text_bytes: int) -> None:
        self.dest = dest
        self.max_file_bytes = max_file_bytes
        self.max_text_bytes = max_text_bytes
        self.form = ReceivedForm()
        self.parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._text = bytearray()
        self._out: Any = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_value, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.part_data, "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(422, "invalid_parameter", f"the form has more than {MAX_PARTS} parts; send each field once")
        self._headers, self._name, self._text = {}, None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        raw_name = options.get(b"name")
        if disposition != b"form-data" or raw_name is None:
            raise ApiError(422, "invalid_parameter", "a form part has no Content-Disposition: form-data; name=...; send a standard multipart form")
        name = raw_name.decode("utf-8", "replace")
        if name != FILE_FIELD and name not in TEXT_FIELDS:
            known = ", ".join((FILE_FIELD, *TEXT_FIELDS))
            raise ApiError(422, "invalid_parameter", f"unknown form field {name[:40]!r}; known: {known}")
        if name in self.form.fields or (name == FILE_FIELD and self.form.has_video):
            raise ApiError(422, "invalid_parameter", f"the field {name!r} was sent more than once; send it once")
        self._name = name
        if name == FILE_FIELD:
            self.form.has_video = True
            filename = options.get(b"filename")
            self.form.filename = filename.decode("utf-8", "replace")[:200] if filename is not None else None
            self._out = self._open(self.dest)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == FILE_FIELD:
            self.form.video_bytes += end - start
            if self.form.video_bytes > self.max_file_bytes:
                raise ApiError(413, "payload_too_large", too_large_message(self.max_file_bytes))
            self._write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > self.max_text_bytes:
            raise ApiError(422, "invalid_parameter", f"the field {self._name!r} is longer than {self.max_text_bytes} bytes")

    def part_end(self) -> None:
        if self._name == FILE_FIELD:
            self.close()
            return
        assert self._name is not None
        try:
            value = bytes(self._text).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_parameter", f"the field {self._name!r} is not valid UTF-8 text; send it UTF-8 encoded") from None
        if value == "" and self._name not in EMPTY_ALLOWED:
            raise ApiError(
                422, "invalid_parameter", f"the field {self._name!r} is empty; leave it out to use the default, or send a value"
            )
        self.form.fields[self._name] = value

    def _open(self, dest: Path) -> Any:
        try:
            return open(dest, "wb")
        except OSError as e:
            raise _storage_refusal(e) from None

    def _write(self, chunk: bytes) -> None:
        try:
            self._out.write(chunk)
        except OSError as e:
            raise _storage_refusal(e) from None

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.close()
            except OSError as e:
                raise _storage_refusal(e) from None


def _storage_refusal(e: OSError) -> ApiError:
    if is_storage_error(e):
        return ApiError(507, "insufficient_storage", f"the upload could not be stored: {describe_storage_error(e)}; try again later")
    raise e


async def receive_form(
    content_type: str, chunks: AsyncIterator[bytes], dest: Path, *, max_file_bytes: int, max_text_bytes: int
) -> ReceivedForm:
    """Parse a multipart submission as it arrives, writing its video to ``dest``. Raises
    :class:`ApiError` (and removes ``dest``) for any malformed, ambiguous or oversized form."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(
            415, "unsupported_media_type",
            "send the request as multipart/form-data with the video in the 'video' field (e.g. curl -F video=@clip.mp4)",
        )
    receiver = _Receiver(dest, max_file_bytes, max_text_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in chunks:
            if chunk:
                try:
                    parser.write(chunk)
                except MultipartParseError:
                    raise ApiError(
                        400, "malformed_body",
                        "the multipart body does not follow its boundary (CRLF line endings, the boundary given in "
                        "Content-Type, at most 8 headers per part); let the HTTP client build the form (curl -F, FormData)",
                    ) from None
        parser.finalize()
        if parser.state != MultipartState.END:
            raise ApiError(
                400, "incomplete_body",
                "the multipart body ended before its closing boundary (the upload was cut short); send the whole request",
            )
        receiver.close()
    except BaseException:
        try:
            receiver.close()
        except Exception:
            pass  # the original error is the one to report
        finally:
            dest.unlink(missing_ok=True)
        raise
    if not receiver.form.has_video:
        dest.unlink(missing_ok=True)
        if "duration" not in receiver.form.fields:
            low, high = TEXT_ONLY_SECONDS
            raise ApiError(
                422, "invalid_parameter",
                "video is required: send the clip in the multipart file field 'video' (or, for text to audio, leave "
                f"it out and send duration: the seconds of audio to make, {low:g} to {high:g})",
            )
        return receiver.form  # text to audio (see check_text_only)
    if receiver.form.video_bytes == 0:
        dest.unlink(missing_ok=True)
        raise ApiError(422, "invalid_video", "the uploaded video is empty (0 bytes); send the file's contents in the 'video' field")
    return receiver.form


def form_model(config: ServerConfig) -> type[BaseModel]:
    """The text fields of a submission with this server's limits, as a pydantic model."""
    chars = config.max_prompt_chars
    return create_model(
        "GenerationForm",
        __config__=ConfigDict(extra="forbid"),
        prompt=(str, Field("", max_length=chars, description="What the scene should sound like")),
        negative_prompt=(str, Field(DEFAULT_NEGATIVE_PROMPT, max_length=chars, description="What to avoid")),
        steps=(int, Field(config.default_steps, ge=1, le=config.max_steps, description="Denoising steps (cost grows with it)")),
        guidance=(float, Field(config.default_guidance, ge=0.0, le=100.0, allow_inf_nan=False, description="Classifier-free guidance scale")),
        seed=(int, Field(0, ge=0, le=MAX_SEED, description="Random seed: the same seed and inputs give the same audio")),
        output=(Optional[Literal["mp4", "wav", "flac"]], Field(None, description=(
            "mp4 (the video with the new sound), wav or flac; default mp4, or wav without a video"))),
        priority=(Optional[Literal["interactive", "bulk"]], Field(None, description=f"Queue class (default {config.default_priority})")),
        keep_original_audio=(Optional[float], Field(None, ge=0.0, le=4.0, allow_inf_nan=False, description="Mix the video's own sound under the Foley at this gain (mp4 only)")),
        loudness=(
            Union[Annotated[float, Field(ge=MIN_TARGET_LUFS, le=MAX_TARGET_LUFS, allow_inf_nan=False)], Literal["off"]],
            Field(DEFAULT_LOUDNESS, description=(
                f"Integrated loudness of the output in LUFS (default {DEFAULT_LOUDNESS:g}, EBU R128; -14 or -16 for web), "
                f"true peak under {DEFAULT_TRUE_PEAK_DBTP:g} dBTP; a kept original is ducked under and the mix normalised; "
                f"off: the raw model output")),
        ),
        # Strings: a form field is text, and a Literal of ints refuses "16".
        bit_depth=(Optional[Literal["16", "24"]], Field(None, description="PCM bits of wav/flac output (default: 32-bit float wav, 24-bit flac)")),
        start=(float, Field(0.0, ge=0.0, lt=1e7, allow_inf_nan=False, description="Score the video from this second on")),
        duration=(Optional[float], Field(None, gt=0.0, lt=1e7, allow_inf_nan=False, description=(
            "With a video: seconds to score from start (default: to the end; over 15 s runs in overlapping windows; "
            f"15 from 0 is the official single clip). Without a video (text to audio): the seconds of audio to make, "
            f"{TEXT_ONLY_SECONDS[0]:g} to {TEXT_ONLY_SECONDS[1]:g}, required"))),
        num_samples=(int, Field(1, ge=NUM_SAMPLES[0], le=NUM_SAMPLES[1], description=(
            f"Samples to make, {NUM_SAMPLES[0]} to {NUM_SAMPLES[1]}, with seeds seed, seed + 1, ...: one denoising "
            "batch; the job's results list them (clips up to 15 s and text to audio)"))),
        best_of=(Optional[int], Field(None, ge=BEST_OF[0], le=BEST_OF[1], description=(
            f"Best of N, {BEST_OF[0]} to {BEST_OF[1]}: num_samples N plus a ranking. The N samples are scored (DeSync "
            "against the video, CLAP against the prompt), the job's candidates carry every score and audio_url/video_url "
            "are the best one's; every candidate stays downloadable. Send best_of or num_samples, not both"))),
        rank=(Optional[str], Field(None, max_length=64, description=(
            f"With best_of: the measures that rank, in order (default {DEFAULT_RANK}; or clap, desync). DeSync needs "
            "4.8 s of video: a shorter clip, or text to audio, is ranked by CLAP and the job's warnings say so"))),
    )


def resolve_best_of(params: dict[str, Any], sent: dict[str, str]) -> None:
    """Turn best_of into num_samples plus a checked ``rank`` (``"desync,clap"``), in ``params``.
    Raises a 422 :class:`ApiError` naming the field."""
    from foleyserve.scoring import parse_measures

    n, rank = params.get("best_of"), params.get("rank")
    if n is None:
        if rank is not None:
            raise ApiError(422, "invalid_parameter", "rank orders the candidates of best_of; send best_of too, or leave rank out")
        return
    if "num_samples" in sent:
        raise ApiError(422, "invalid_parameter", (
            f"send best_of or num_samples, not both: best_of={n} already makes {n} samples (and ranks them)"))
    try:
        measures = parse_measures(rank if rank is not None else DEFAULT_RANK)
    except ValueError as e:
        raise ApiError(422, "invalid_parameter", f"rank: {e}") from None
    params["num_samples"], params["rank"] = n, ",".join(measures)


def check_text_only(params: dict[str, Any]) -> None:
    """The rules of a submission without a video; ``params`` is the parsed form (output resolved
    here: wav by default). Raises a 422 :class:`ApiError` naming the field."""
    low, high = TEXT_ONLY_SECONDS
    d = params.get("duration")
    if d is None or not low <= d <= high:
        raise ApiError(422, "invalid_parameter", (
            f"without a video, duration is the length of the audio to make: {low:g} to {high:g} seconds, "
            f"got {d!r}; send a video to score a longer clip"))
    if params.get("output") == "mp4":
        raise ApiError(422, "invalid_parameter", "output=mp4 needs a video to put the sound in; without one ask for wav or flac")
    if params.get("keep_original_audio") is not None:
        raise ApiError(422, "invalid_parameter", "keep_original_audio mixes in a video's own sound; without a video, leave it out")
    if params.get("start"):
        raise ApiError(422, "invalid_parameter", "start is a time in the video; without a video, leave it out")
    params["output"] = params.get("output") or "wav"


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The endpoint's requestBody for the OpenAPI document: the model's fields plus the video."""
    schema = model.model_json_schema()
    schema["properties"] = {
        FILE_FIELD: {"type": "string", "format": "binary", "description": (
            "The video (MP4, MOV, MKV, WebM...); all of it is scored (see start, duration). Leave it out for text "
            "to audio: then duration is required and output is wav or flac")},
        **schema["properties"],
    }
    schema.pop("required", None)  # the video or, without one, duration
    schema.pop("additionalProperties", None)
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def parse_fields(model: type[BaseModel], fields: dict[str, str]) -> BaseModel:
    """Validate the text fields; a ValidationError carries pydantic's per-field errors."""
    return model.model_validate(fields)


__all__ = ["BEST_OF", "DEFAULT_RANK", "NUM_SAMPLES", "RANK_MEASURES", "ReceivedForm", "ValidationError", "check_text_only", "form_model", "openapi_request_body", "parse_fields", "receive_form", "resolve_best_of", "too_large_message"]
