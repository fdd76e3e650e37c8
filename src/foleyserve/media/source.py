"""Opening and probing videos: what a file is, whether it can be used, and its header facts."""

from __future__ import annotations

import codecs
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Union

import av

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

MAX_SECONDS = 15.0
SYNC_FPS = 25
SIGLIP_FPS = 8
MIN_SYNC_FRAMES = 16  # one Synchformer window
SAMPLE_RATE = 48000
# The request budget (check_budget): the server's defaults, server/settings.py max_video_pixels.
# A 1080p frame is 1920x1080 but H.264 codes it as 1920x1088, hence the 8 extra rows.
DEFAULT_MAX_PIXELS = 1920 * 1088
# No duration limit by default: decoding stops after MAX_SECONDS whatever the file's length.
DEFAULT_MAX_SECONDS: float | None = None
# Demuxers that only read still images (FFmpeg's image2 and the *_pipe family).
_IMAGE_DEMUXER = "image2"
# Demuxers of formats that are an image when they hold a single frame.
_ANIMATED_IMAGE_FORMATS = ("gif", "apng", "webp")
_VIDEO_ADVICE = "pass a video clip (MP4, MOV, MKV, WebM...) at least 0.64 s long"


class MediaError(ValueError):
    """A video or audio file that cannot be used; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# opening and probing


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None  # seconds, from the container/stream header
    frame_rate: Fraction | None  # average rate (a VFR file has no single rate)
    fps: float | None
    num_frames: int | None  # from the header; None when the container does not say
    width: int
    height: int
    has_video: bool  # always True here: a file without video raises MediaError
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    container: str
    video_codec: str | None
    audio_codec: str | None


def _label(source: VideoSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return str(source)


def _sniff(head: bytes) -> str | None:
    """Name of the container family the first bytes announce, if any (to tell 'truncated' from 'not a video')."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "MP4/MOV"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "Matroska/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"FLV"):
        return "FLV"
    if head.startswith(b"OggS"):
        return "Ogg"
    if head.startswith(b"\x00\x00\x01\xba") or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return "MPEG-PS/TS"
    return None


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"), (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x01\x00", "an ICO image"), (b"\xff\x0a", "a JPEG XL image"), (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"),
    (b"ID3", "an MP3 audio file"), (b"fLaC", "a FLAC audio file"),
)
# ISO-BMFF brands of still images (HEIF/AVIF): an 'ftyp' box does not make a file an MP4 video.
_IMAGE_BRANDS = {b"avif": "an AVIF image", b"avis": "an AVIF image", b"heic": "a HEIC image", b"heix": "a HEIC image",
                 b"mif1": "a HEIF image", b"msf1": "a HEIF image", b"heim": "a HEIC image", b"heis": "a HEIC image"}


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is weak evidence; the DIB header that follows has one of a few known sizes.
    return len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)


def describe_non_video(head: bytes) -> str | None:
    """What a file obviously is when it is not a video, from its first bytes (a few hundred suffice).

    Returns a phrase such as "a PNG image" or "an HTML page", or None when the bytes could be a
    video (or are unknown). Images end in "image", so callers can tell them apart."""
    for magic, what in _MAGIC:
        if head.startswith(magic) and (magic != b"BM" or _is_bmp(head)):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "a WAV audio file"
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
        return _IMAGE_BRANDS[head[8:12]]
    if head and b"\x00" not in head and _sniff(head) is None:
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


def _image_error(label: str, kind: str) -> MediaError:
    return MediaError(
        f"{label} is {kind}, not a video file: HunyuanVideo-Foley generates sound for moving pictures; {_VIDEO_ADVICE}"
    )


def _is_image_demuxer(container: av.container.InputContainer) -> bool:
    name = container.format.name
    return name == _IMAGE_DEMUXER or name.endswith("_pipe")


def _still_image_kind(container: av.container.InputContainer, head: bytes) -> str:
    described = describe_non_video(head)
    if described is not None and described.endswith("image"):
        return described
    return f"a still image ({container.format.name.removesuffix('_pipe')})"


def time_origin(container: av.container.InputContainer) -> Fraction:
    """Seconds to subtract from timestamps (exact): the container's start time when positive.

    MPEG-TS/PS streams start wherever the muxer's clock was (1.4 s for the ffmpeg CLI's defaults);
    the ffmpeg CLI shifts them to 0 when it muxes the official's output, so frame times are measured
    from there. Negative starts (B-frame delay without an edit list) are left alone: frames before 0
    are skipped, as in the official."""
    start = container.start_time
    return Fraction(start, av.time_base) if start is not None and start > 0 else Fraction(0)


def _open(source: VideoSource) -> av.container.InputContainer:
    label = _label(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError("the uploaded video is empty (0 bytes); send the file's contents")
        head, target = data[:200], io.BytesIO(data)
    else:
        path = Path(source)
        if not path.exists():
            raise MediaError(f"video file not found: {path}; check the path")
        if path.is_dir():
            raise MediaError(f"{path} is a directory, not a video file; pass the path of a video")
        try:
            with open(path, "rb") as fh:
                head = fh.read(200)
        except OSError as e:
            raise MediaError(f"cannot read {path}: {e.strerror}; check its permissions") from e
        if not head:
            raise MediaError(f"{path} is empty (0 bytes); re-export or re-download the video")
        target = str(path)
    try:
        container = av.open(target, metadata_errors="replace")
    except av.error.FFmpegError as e:
        family = _sniff(head)
        if family is not None:
            raise MediaError(
                f"{label} looks like a {family} file but cannot be opened ({e.strerror}): it is truncated or "
                f"corrupt (for MP4 the index, the 'moov' atom, is often missing when a download or recording "
                f"was cut short); re-download or re-export the video"
            ) from e
        kind = describe_non_video(head)
        if kind is not None:
            raise MediaError(f"{label} is {kind}, not a video file; {_VIDEO_ADVICE}") from e
        raise MediaError(
            f"{label} is not a video file FFmpeg can read ({e.strerror}); use a common video format "
            f"such as MP4 (H.264), MOV, MKV or WebM"
        ) from e
    if _is_image_demuxer(container):
        kind = _still_image_kind(container, head)
        container.close()
        raise _image_error(label, kind)
    return container


def _single_frame_image_error(container: av.container.InputContainer, label: str) -> MediaError | None:
    """The error for a GIF/APNG/WebP holding one frame (a still image); None for other formats."""
    name = container.format.name
    if name not in _ANIMATED_IMAGE_FORMATS:
        return None
    return _image_error(label, {"gif": "a GIF image", "apng": "an APNG image", "webp": "a WebP image"}[name])


def _video_stream(container: av.container.InputContainer, label: str) -> av.VideoStream:
    if not container.streams.video:
        if container.streams.audio:
            raise MediaError(
                f"{label} contains audio but no video stream; HunyuanVideo-Foley generates sound FOR a "
                f"video, so pass a video file"
            )
        raise MediaError(f"{label} contains no video stream (and no audio); pass a video file")
    return container.streams.video[0]


def _header_duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _info(container: av.container.InputContainer, stream: av.VideoStream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    audio = container.streams.audio[0] if container.streams.audio else None
    return VideoInfo(
        duration=_header_duration(container, stream),
        frame_rate=Fraction(rate) if rate else None,
        fps=float(rate) if rate else None,
        num_frames=stream.frames or None,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        has_video=True,
        has_audio=audio is not None,
        audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
        audio_channels=audio.codec_context.channels if audio is not None else None,
        container=container.format.name,
        video_codec=stream.codec_context.name,
        audio_codec=audio.codec_context.name if audio is not None else None,
    )


def _frames(container: av.container.InputContainer, stream: av.VideoStream, errors: list[str]) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order; bad packets are skipped and reported through ``errors``."""
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            return
        except av.error.FFmpegError as e:  # a read error: the file ends or breaks here
            errors.append(f"read error: {e.strerror}")
            return
        try:
            decoded = packet.decode()
        except av.error.FFmpegError as e:
            errors.append(f"decode error at packet pts={packet.pts}: {e.strerror}")
            continue
        yield from decoded


def probe(source: VideoSource) -> VideoInfo:
    """Header facts about a video, after checking that at least one frame decodes."""
    label = _label(source)
    with _open(source) as container:
        stream = _video_stream(container, label)
        info = _info(container, stream)
        errors: list[str] = []
        frames = _frames(container, stream, errors)
        if next(frames, None) is None:
            raise _no_frames_error(label, errors)
        if container.format.name in _ANIMATED_IMAGE_FORMATS and next(frames, None) is None:
            raise _single_frame_image_error(container, label)  # type: ignore[misc]
    return info


def check_budget(
    info: VideoInfo, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> None:
    """Refuse a video over the request budget, with a MediaError naming the limit and the fix.

    ``max_pixels`` bounds width x height of one frame (decoding converts one full-resolution frame at
    a time, so this is what bounds a request's host memory); ``max_seconds`` bounds the header's
    duration. None turns a limit off. The defaults are the server's (``max_video_pixels``)."""
    pixels = info.width * info.height
    if max_pixels is not None and pixels > max_pixels:
        raise MediaError(
            f"the video is {info.width}x{info.height} ({pixels / 1e6:.1f} MP per frame), over the limit of "
            f"{max_pixels / 1e6:.1f} MP per frame (max_pixels={max_pixels}); scale it down, e.g. "
            f"ffmpeg -i in.mp4 -vf scale=-2:1080 out.mp4 (the model sees 512x512 and 224x224 frames anyway), "
            f"or raise the limit"
        )
    if max_seconds is not None and info.duration is not None and info.duration > max_seconds:
        raise MediaError(
            f"the video is {info.duration:.2f} s long, over the limit of {max_seconds:g} s (max_seconds); "
            f"cut it, e.g. ffmpeg -i in.mp4 -t {max_seconds:g} -c copy out.mp4, or raise the limit "
            f"(the model uses at most the first {MAX_SECONDS:g} s)"
        )


def _no_frames_error(label: str, errors: list[str]) -> MediaError:
    why = f" ({errors[0]})" if errors else ""
    return MediaError(
        f"{label} has a video stream but no decodable frames{why}: it is empty, truncated or corrupt; "
        f"re-export the video"
    )
