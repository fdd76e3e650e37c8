"""Video in, audio out: probing, frame sampling, the two visual preprocessors, WAV/FLAC and MP4 muxing.

Everything goes through PyAV (no ffmpeg binary) and plain torch ops (no torchvision, no PIL).

Faithfulness notes (the official code is HunyuanVideo-Foley ``utils/feature_utils.py``,
``utils/model_utils.py`` and ``utils/media_utils.py``):

* Frame sampling is the official ``get_frames_av`` rule, done for every rate in ONE decode pass
  instead of one pass per rate. Unlike the official loop we stop demuxing at the first frame past
  ``max_seconds`` instead of decoding the rest of the file; for monotonic timestamps (what a decoder
  outputs) the selected frames are identical.
* SigLIP2: the official squashes each frame to 512x512 with PIL bilinear (PIL antialiases), then
  ToTensor and Normalize(0.5, 0.5). We use torch's native uint8 bilinear+antialias kernel, which was
  written to reproduce PIL: it is bit-identical to Pillow 13 on most shapes and never more than one
  uint8 step off (see tests/test_media.py). Resizing in float instead would be up to one step off on
  about a third of the pixels.
* Synchformer: torchvision v2 ``Resize(224, BICUBIC)`` on the uint8 [T, 3, H, W] CPU tensor. Since
  torchvision 0.16 (pytorch/vision#7668) that calls ``interpolate`` directly on uint8 on the CPU
  (torch's fixed-point, PIL-style two-pass kernel); it no longer goes through float. The two paths
  differ by up to several uint8 steps near edges (bicubic overshoot is clamped between the passes),
  so we take the native uint8 path as the official does, and the float/round/clamp path only where
  torch has no uint8 kernel (CUDA), exactly like torchvision. Then ``CenterCrop(224)`` (offset
  ``int(round((size - 224) / 2.0))``), ``ToDtype(float32, scale=True)`` which is
  ``x.to(float32).mul_(1.0 / 255)`` (a multiply by float32(1/255), not a division: they differ by
  one ulp on about half of the 256 values), and ``Normalize(0.5, 0.5)`` = ``(x - 0.5) / 0.5``.
* Output: the official writes a mono float32 WAV (torchaudio) and muxes with
  ``ffmpeg -c:v copy -c:a aac -ac 2 -af pan=stereo|c0=c0|c1=c0 -b:a 192k`` without ``-shortest``.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
Waveform = Union[torch.Tensor, np.ndarray]

MAX_SECONDS = 15.0
SYNC_FPS = 25
SIGLIP_FPS = 8
MIN_SYNC_FRAMES = 16  # one Synchformer window
SAMPLE_RATE = 48000
SIGLIP_SIZE = 512
SYNC_SIZE = 224

_WRITE_EXTENSIONS = (".wav", ".flac")


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
        return av.open(target, metadata_errors="replace")
    except av.error.FFmpegError as e:
        family = _sniff(head)
        if family is not None:
            raise MediaError(
                f"{label} looks like a {family} file but cannot be opened ({e.strerror}): it is truncated or "
                f"corrupt (for MP4 the index, the 'moov' atom, is often missing when a download or recording "
                f"was cut short); re-download or re-export the video"
            ) from e
        raise MediaError(
            f"{label} is not a video file FFmpeg can read ({e.strerror}); use a common video format "
            f"such as MP4 (H.264), MOV, MKV or WebM"
        ) from e


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
        if next(_frames(container, stream, errors), None) is None:
            raise _no_frames_error(label, errors)
    return info


def _no_frames_error(label: str, errors: list[str]) -> MediaError:
    why = f" ({errors[0]})" if errors else ""
    return MediaError(
        f"{label} has a video stream but no decodable frames{why}: it is empty, truncated or corrupt; "
        f"re-export the video"
    )


# ---------------------------------------------------------------------------------------------
# frame sampling


@dataclass
class DecodedVideo:
    frames: dict[int, np.ndarray]  # fps -> uint8 [T, H, W, 3] (RGB, full resolution)
    duration: float  # the whole video in seconds: the header's, or the frames' end when they run longer
    last_frame_time: float  # timestamp of the last frame that was looked at (<= max_seconds)
    info: VideoInfo
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, fps: int) -> np.ndarray:
        return self.frames[fps]


class _Growable:
    """Append-only frame array; preallocated from the expected count so frames are copied once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.data: np.ndarray | None = None
        self.n = 0

    def append(self, frame: np.ndarray) -> None:
        if self.data is None:
            self.data = np.empty((self.capacity, *frame.shape), np.uint8)
        elif self.n == len(self.data):
            grown = np.empty((2 * len(self.data), *frame.shape), np.uint8)
            grown[: self.n] = self.data
            self.data = grown
        self.data[self.n] = frame
        self.n += 1

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.data is None:
            return np.empty((0, *shape), np.uint8)
        return self.data[: self.n]


def decode_frames(
    source: VideoSource,
    *,
    fps_list: Sequence[int | float] = (SIGLIP_FPS, SYNC_FPS),
    max_seconds: float = MAX_SECONDS,
) -> DecodedVideo:
    """Decode once and resample to every rate in ``fps_list`` with the official rule.

    Per rate, sample times are 0, 0+1/fps, (0+1/fps)+1/fps, ... (float64, accumulated, so the error
    matters at exact boundaries); each decoded frame is emitted while its timestamp is >= the next
    sample time, so frames repeat when upsampling and are dropped when downsampling. Frames before 0
    are ignored and decoding stops at the first frame later than ``max_seconds``.
    """
    label = _label(source)
    rates = list(dict.fromkeys(fps_list))
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"fps_list must hold positive rates, got {fps_list!r}")
    warnings: list[str] = []
    with _open(source) as container:
        stream = _video_stream(container, label)
        info = _info(container, stream)
        stream_duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
        stream.thread_type = "AUTO"
        span = min(info.duration if info.duration else max_seconds, max_seconds)
        buffers = {r: _Growable(int(math.ceil(span * r)) + 2) for r in rates}
        next_time = {r: 0.0 for r in rates}
        delta = {r: 1 / r for r in rates}
        shape: tuple[int, int, int] | None = None
        errors: list[str] = []
        last_time = prev_time = last_span = None
        hit_limit = False
        n_decoded = 0
        for frame in _frames(container, stream, errors):
            t = frame.time
            if t is None:  # no timestamp at all: assume the nominal spacing after the previous frame
                t = (prev_time + 1 / info.fps) if (prev_time is not None and info.fps) else 0.0
            prev_time = t
            n_decoded += 1
            if t < 0:
                continue
            if t > max_seconds:
                hit_limit = True
                break
            last_time = t
            last_span = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
            rgb = None
            for r in rates:
                while t >= next_time[r]:
                    if rgb is None:
                        if shape is None:
                            rgb = frame.to_ndarray(format="rgb24")
                            shape = rgb.shape
                        elif (frame.height, frame.width) != shape[:2]:
                            # Mid-stream resolution change: keep the first size so the clip stacks.
                            rgb = frame.to_ndarray(format="rgb24", width=shape[1], height=shape[0])
                        else:
                            rgb = frame.to_ndarray(format="rgb24")
                    buffers[r].append(rgb)
                    next_time[r] += delta[r]
    if last_time is None:
        if n_decoded:
            raise MediaError(f"{label}: every frame has a negative timestamp, nothing to use; re-export the video")
        raise _no_frames_error(label, errors)
    # The last frame lasts its own duration when the container says (a VFR still can last seconds).
    frame_step = last_span if last_span is not None else (1 / info.fps if info.fps else 0.0)
    if info.duration is not None:
        # Headers can undercount (an MP4 written with constant-rate durations for a VFR stream, say).
        duration = max(info.duration, last_time + frame_step)
    elif hit_limit:
        duration = max_seconds  # a lower bound: the header does not say and we stopped reading
    else:
        duration = last_time + frame_step
    # How far the frames should have gone: the video track's own length is trustworthy (an MP4 sample
    # table, say); a container-wide length may include a longer audio track, so it only warrants a warning.
    expected_end = min(duration, max_seconds)
    short_by = expected_end - (last_time + frame_step)
    if not hit_limit and short_by > 0.5 and (errors or stream_duration is not None):
        why = f" ({errors[0]})" if errors else ""
        raise MediaError(
            f"{label} is truncated or corrupt: frames decode only up to {last_time:.2f} s of "
            f"{duration:.2f} s{why}; re-download or re-export the video"
        )
    if errors:
        warnings.append(f"{len(errors)} damaged packet(s) skipped while decoding {label} ({errors[0]})")
    if not hit_limit and short_by > 0.5:
        warnings.append(f"{label}: the header says {duration:.2f} s but video frames end at {last_time:.2f} s")
    for w in warnings:
        log.warning(w)
    assert shape is not None
    frames = {int(r) if float(r).is_integer() else r: buffers[r].array(shape) for r in rates}
    return DecodedVideo(frames=frames, duration=duration, last_frame_time=last_time, info=info, warnings=warnings)


def check_min_frames(frames: np.ndarray | torch.Tensor | int, *, min_frames: int = MIN_SYNC_FRAMES, fps: int = SYNC_FPS) -> None:
    """Refuse clips too short for one Synchformer window (the official crashes on them)."""
    n = frames if isinstance(frames, int) else len(frames)
    if n < min_frames:
        raise MediaError(
            f"video too short: {n} frame(s) at {fps} fps ({n / fps:.2f} s); the minimum is {min_frames} frames "
            f"at {fps} fps = {min_frames / fps:.2f} s; use a longer clip"
        )


# ---------------------------------------------------------------------------------------------
# preprocessing


def _as_nchw_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        if not frames.flags.writeable:
            frames = frames.copy()  # torch.from_numpy would warn about read-only memory
        frames = torch.from_numpy(frames)
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 RGB [T, H, W, 3], got dtype {frames.dtype}")
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got shape {tuple(frames.shape)}")
    # A view, not a copy: [T, 3, H, W] in channels-last memory, exactly what the official gets from
    # torch.from_numpy(frames).permute(0, 3, 1, 2); the uint8 kernels are fastest on this layout.
    return frames.permute(0, 3, 1, 2)


def _resize_uint8(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    # No uint8 interpolate kernels off the CPU: torchvision's own fallback.
    y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
    if mode == "bicubic":
        y = y.clamp_(0, 255)
    return y.round_().to(torch.uint8)


def siglip_pixels(frames: np.ndarray | torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, 512, 512] in [-1, 1] (squashed, aspect ratio not kept)."""
    x = _as_nchw_uint8(frames)
    out = torch.empty((x.shape[0], 3, SIGLIP_SIZE, SIGLIP_SIZE), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        part = x[s : s + chunk]
        if tuple(part.shape[-2:]) != (SIGLIP_SIZE, SIGLIP_SIZE):
            part = _resize_uint8(part, (SIGLIP_SIZE, SIGLIP_SIZE), "bilinear")
        o = out[s : s + chunk]
        o.copy_(part)
        o.div_(255).sub_(0.5).div_(0.5)  # ToTensor, then Normalize(0.5, 0.5)
    return out


def synchformer_size(height: int, width: int, size: int = SYNC_SIZE) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of Resize(size) + CenterCrop(size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def synchformer_pixels(frames: np.ndarray | torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224] in [-1, 1] (short side to 224, center crop)."""
    x = _as_nchw_uint8(frames)
    h, w = x.shape[-2:]
    new_h, new_w, top, left = synchformer_size(h, w)
    out = torch.empty((x.shape[0], 3, SYNC_SIZE, SYNC_SIZE), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        part = x[s : s + chunk]
        if (new_h, new_w) != (h, w):
            part = _resize_uint8(part, (new_h, new_w), "bicubic")
        part = part[..., top : top + SYNC_SIZE, left : left + SYNC_SIZE]
        o = out[s : s + chunk]
        o.copy_(part)
        o.mul_(1.0 / 255).sub_(0.5).div_(0.5)  # ToDtype(float32, scale=True), Normalize(0.5, 0.5)
    return out


# ---------------------------------------------------------------------------------------------
# audio out


def _as_channels(waveform: Waveform) -> np.ndarray:
    """Any mono/stereo waveform -> float32 [C, T] numpy."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(waveform, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] not in (1, 2) or a.shape[1] == 0:
        raise ValueError(f"waveform must be [T], [1, T] or [2, T] with T > 0, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _audio_frame(samples: np.ndarray, fmt: str, rate: int) -> av.AudioFrame:
    """[C, T] array already in the sample format's dtype -> one AudioFrame."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    planar = av.AudioFormat(fmt).is_planar
    data = samples if planar else samples.T.reshape(1, -1)  # packed formats interleave the channels
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    return frame


def _to_int(samples: np.ndarray, bits: int) -> np.ndarray:
    # Symmetric full scale (2^(bits-1) - 1) so +1.0 and -1.0 both fit without clipping asymmetry.
    scale = float(2 ** (bits - 1) - 1)
    q = np.rint(np.clip(samples, -1.0, 1.0).astype(np.float64) * scale)
    if bits == 16:
        return q.astype(np.int16)
    return q.astype(np.int32) << (32 - bits)  # 24-bit samples live in the top bits of s32


def _prepare_output(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MediaError(f"cannot create the output folder for {path}: {e.strerror}; choose a writable path") from e
    if path.is_dir():
        raise MediaError(f"cannot write {path}: it is a directory; give a file name")


def _open_output(path: Path, fmt: str) -> av.container.OutputContainer:
    try:
        return av.open(str(path), "w", format=fmt)
    except (OSError, av.error.FFmpegError) as e:
        raise MediaError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}; choose a writable path") from e


def _remove_partial(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_audio(path: str | os.PathLike, waveform: Waveform, sample_rate: int = SAMPLE_RATE, *, bits: int | None = None) -> Path:
    """Write a mono (or stereo) waveform as .wav or .flac.

    WAV defaults to 32-bit float, like the official (torchaudio.save of a float tensor): values are
    stored as they are, nothing is clipped. ``bits=16`` writes 16-bit PCM. FLAC is integer-only:
    24-bit by default, ``bits=16`` for 16-bit; integer formats clip to [-1, 1].
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _WRITE_EXTENSIONS:
        raise MediaError(f"cannot write audio to {path}: use a .wav or .flac file name (or .mp4 to mux with the video)")
    samples = _as_channels(waveform)
    if ext == ".wav":
        if bits in (None, 32):
            fmt, codec, data = "flt", "pcm_f32le", samples
        elif bits == 16:
            fmt, codec, data = "s16", "pcm_s16le", _to_int(samples, 16)
        else:
            raise ValueError(f"WAV bits must be 32 (float) or 16, got {bits}")
        container_fmt = "wav"
    else:
        if bits in (None, 24):
            fmt, codec, data = "s32", "flac", _to_int(samples, 24)
        elif bits == 16:
            fmt, codec, data = "s16", "flac", _to_int(samples, 16)
        else:
            raise ValueError(f"FLAC bits must be 24 or 16, got {bits}")
        container_fmt = "flac"
    _prepare_output(path)
    out = _open_output(path, container_fmt)
    try:
        with out:
            stream = out.add_stream(codec, rate=sample_rate)
            stream.layout = "mono" if data.shape[0] == 1 else "stereo"
            stream.format = fmt
            for packet in stream.encode(_audio_frame(data, fmt, sample_rate)):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except (OSError, av.error.FFmpegError) as e:
        _remove_partial(path)
        raise MediaError(f"writing {path} failed: {getattr(e, 'strerror', None) or e}; check the disk and path") from e
    return path


# ---------------------------------------------------------------------------------------------
# muxing


@dataclass
class MuxResult:
    path: Path
    video_copied: bool  # False when the video had to be re-encoded to H.264
    notes: list[str] = field(default_factory=list)


def _parse_bitrate(bitrate: str | int) -> int:
    if isinstance(bitrate, int):
        return bitrate
    s = bitrate.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult != 1 else s) * mult)


def _resample_48k(frames: Iterator[av.AudioFrame], layout: str = "stereo") -> tuple[np.ndarray, float | None]:
    """Decoded audio frames -> float32 [C, N] at 48 kHz and the time of the first sample."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    start: float | None = None
    for frame in frames:
        if start is None and frame.time is not None:
            start = frame.time
        chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    channels = 1 if layout == "mono" else 2
    if not chunks:
        return np.zeros((channels, 0), np.float32), start
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), start


def _foley_stereo(waveform: Waveform, sample_rate: int) -> np.ndarray:
    a = _as_channels(waveform)
    if a.shape[0] == 1:
        a = np.concatenate([a, a])  # pan=stereo|c0=c0|c1=c0: the mono track on both channels
    if sample_rate == SAMPLE_RATE:
        return a
    out, _ = _resample_48k(iter([_audio_frame(a, "fltp", sample_rate)]))
    return out


def _original_audio(container: av.container.InputContainer, video_start: float) -> np.ndarray | None:
    if not container.streams.audio:
        return None
    audio = container.streams.audio[0]

    def frames() -> Iterator[av.AudioFrame]:
        for packet in container.demux(audio):
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue  # a damaged packet only leaves a gap in a background track

    # A mono track goes on both channels at full level, like the Foley (FFmpeg's own mono->stereo
    # upmix would lower it by 3 dB).
    mono = audio.codec_context.channels == 1
    samples, start = _resample_48k(frames(), "mono" if mono else "stereo")
    if mono:
        samples = np.concatenate([samples, samples])
    # Place the track on the video's clock (an audio track may start before or after the video).
    offset = int(round(((start or 0.0) - video_start) * SAMPLE_RATE))
    if offset > 0:
        samples = np.concatenate([np.zeros((2, offset), np.float32), samples], axis=1)
    elif offset < 0:
        samples = samples[:, -offset:]
    return samples


def mux(
    video: VideoSource,
    waveform: Waveform,
    sample_rate: int,
    out_path: str | os.PathLike,
    *,
    keep_original_audio_gain: float | None = None,
    bitrate: str | int = "192k",
) -> MuxResult:
    """MP4 with the source's video stream copied packet for packet and the Foley as stereo AAC 48 kHz.

    Like the official (no ``-shortest``) the output keeps the video's full length even when the audio
    is shorter. ``keep_original_audio_gain`` mixes the source's own first audio track (resampled to
    48 kHz stereo) under the Foley at that linear gain; the sum is clipped to [-1, 1] and lasts as long
    as the longer of the two.

    A video codec that MP4 cannot hold (VP8, Theora, ...) is re-encoded to H.264 (yuv420p, CRF 18,
    odd sizes scaled to the next even size); ``MuxResult.video_copied`` is then False and a note says so.
    """
    out_path = Path(out_path)
    label = _label(video)
    if not isinstance(video, (bytes, bytearray, memoryview)):
        src = Path(video)
        if src.exists() and out_path.exists() and os.path.samefile(src, out_path):
            raise MediaError(f"the output {out_path} is the input video; choose another output path")
    foley = _foley_stereo(waveform, sample_rate)
    notes: list[str] = []
    if keep_original_audio_gain is not None:
        with _open(video) as container:
            vin = _video_stream(container, label)
            video_start = float(vin.start_time * vin.time_base) if vin.start_time is not None else 0.0
            orig = _original_audio(container, video_start)
        if orig is None or orig.shape[1] == 0:
            notes.append(f"{label} has no audio track to keep; the output has the Foley only")
        else:
            n = max(foley.shape[1], orig.shape[1])
            mixed = np.zeros((2, n), np.float32)
            mixed[:, : foley.shape[1]] += foley
            mixed[:, : orig.shape[1]] += np.float32(keep_original_audio_gain) * orig
            foley = np.clip(mixed, -1.0, 1.0)
    with _open(video) as container:
        vin = _video_stream(container, label)
        _prepare_output(out_path)
        out = _open_output(out_path, "mp4")
        try:
            with out:
                copied = True
                try:
                    # PyAV resets the codec tag (an AVI fourcc, say), so the MP4 muxer picks its own.
                    vout = out.add_stream_from_template(vin)
                except ValueError as e:
                    copied = False
                    notes.append(
                        f"the video codec {vin.codec_context.name!r} cannot be stored in MP4 ({e}); "
                        f"the video was re-encoded to H.264"
                    )
                    vout = _h264_stream(out, vin)
                aout = out.add_stream("aac", rate=SAMPLE_RATE)
                aout.layout = "stereo"
                aout.bit_rate = _parse_bitrate(bitrate)
                audio_packets = list(aout.encode(_audio_frame(foley, "fltp", SAMPLE_RATE)))
                audio_packets += list(aout.encode(None))
                if copied:
                    video_packets = _copy_packets(container, vin, vout)
                else:
                    video_packets = _reencode_packets(container, vin, vout, notes)
                _interleave(out, video_packets, audio_packets)
        except (OSError, av.error.FFmpegError) as e:
            _remove_partial(out_path)
            raise MediaError(f"writing {out_path} failed: {getattr(e, 'strerror', None) or e}") from e
        except BaseException:
            _remove_partial(out_path)
            raise
    for note in notes:
        log.warning(note)
    return MuxResult(path=out_path, video_copied=copied, notes=notes)


def _packet_time(p: av.Packet) -> float:
    ts = p.dts if p.dts is not None else p.pts
    return float(ts * p.time_base) if ts is not None and p.time_base is not None else 0.0


def _copy_packets(container: av.container.InputContainer, vin: av.VideoStream, vout: av.VideoStream) -> Iterator[av.Packet]:
    for packet in container.demux(vin):
        if packet.dts is None and packet.pts is None:  # the demuxer's end-of-stream marker
            continue
        packet.stream = vout
        yield packet


def _h264_stream(out: av.container.OutputContainer, vin: av.VideoStream) -> av.VideoStream:
    rate = vin.average_rate or vin.guessed_rate or Fraction(25)
    vout = out.add_stream("libx264", rate=rate)
    vout.width = vin.codec_context.width + (vin.codec_context.width % 2)
    vout.height = vin.codec_context.height + (vin.codec_context.height % 2)
    vout.pix_fmt = "yuv420p"
    vout.time_base = vin.time_base
    vout.codec_context.time_base = vin.time_base
    vout.options = {"crf": "18", "preset": "veryfast"}
    return vout


def _reencode_packets(
    container: av.container.InputContainer, vin: av.VideoStream, vout: av.VideoStream, notes: list[str]
) -> Iterator[av.Packet]:
    errors: list[str] = []
    last_pts = None
    for frame in _frames(container, vin, errors):
        pts = frame.pts
        if pts is None or (last_pts is not None and pts <= last_pts):
            pts = (last_pts + 1) if last_pts is not None else 0
        last_pts = pts
        new = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
        new.pts = pts
        new.time_base = vin.time_base
        yield from vout.encode(new)
    yield from vout.encode(None)
    if errors:
        notes.append(f"{len(errors)} damaged video packet(s) skipped while re-encoding ({errors[0]})")


def _interleave(out: av.container.OutputContainer, video_packets: Iterator[av.Packet], audio_packets: list[av.Packet]) -> None:
    # Feed the muxer in time order so its interleaving queue stays small on long videos.
    i = 0
    for vp in video_packets:
        t = _packet_time(vp)
        while i < len(audio_packets) and _packet_time(audio_packets[i]) <= t:
            out.mux(audio_packets[i])
            i += 1
        out.mux(vp)
    for ap in audio_packets[i:]:
        out.mux(ap)
