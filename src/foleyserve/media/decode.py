"""Frame sampling: one decode pass for every frame rate, each frame preprocessed as it arrives."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Callable, Sequence

import av
import numpy as np
import torch

from foleyserve.media.source import (
    MAX_SECONDS, MIN_SYNC_FRAMES, SIGLIP_FPS, SYNC_FPS, MediaError, VideoInfo, VideoSource,
    _frames, _info, _label, _no_frames_error, _open, _single_frame_image_error, _video_stream, time_origin,
)
from foleyserve.media.preprocess import siglip_frames, synchformer_frames

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# frame sampling

Preprocessor = Callable[[np.ndarray], np.ndarray]


@dataclass
class DecodedVideo:
    """Sampled frames of a clip. ``frames[fps]`` is uint8 [T, H, W, 3] RGB: with ``preprocessed`` the
    8 fps frames are the 512x512 SigLIP2 input and the 25 fps ones the 224x224 Synchformer input
    (both before scaling to [-1, 1]); otherwise full-resolution frames."""

    frames: dict[int, np.ndarray]
    duration: float  # the whole video in seconds: the header's, or the frames' end when they run longer
    last_frame_time: float  # timestamp of the last frame that was looked at (<= max_seconds)
    info: VideoInfo
    warnings: list[str] = field(default_factory=list)
    preprocessed: bool = False

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

    def array(self) -> np.ndarray:
        assert self.data is not None, "at least one frame was sampled at every rate (t=0 always is)"
        return self.data[: self.n]


def _preprocessors(rates: list[int | float], preprocess: bool) -> dict[int | float, Preprocessor | None]:
    if not preprocess:
        return {r: None for r in rates}
    table: dict[int | float, Preprocessor] = {SIGLIP_FPS: siglip_frames, SYNC_FPS: synchformer_frames}
    return {r: table.get(r) for r in rates}


def _frame_time(frame: av.VideoFrame, origin: Fraction) -> float | None:
    """Seconds since ``origin``. At origin 0 this is PyAV's ``frame.time`` (what the official uses);
    otherwise the shift is done on the integer timestamp, so a TS clip's frames get the same float
    times as the clip remuxed to start at 0 (subtracting floats would put some a hair early)."""
    if frame.pts is None or not origin:
        return frame.time
    tb = frame.time_base
    ticks = frame.pts - origin / tb
    if ticks.denominator == 1:
        return float(int(ticks)) * tb.numerator / tb.denominator  # PyAV's formula for frame.time
    return float(ticks * tb)


def frame_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """A decoded frame as uint8 RGB [H, W, 3], and the clip's frame size (the first frame's).
    A mid-stream resolution change is scaled back to the first size so the clip stacks."""
    if size is None:
        size = (frame.height, frame.width)
    if (frame.height, frame.width) != size:
        return frame.to_ndarray(format="rgb24", width=size[1], height=size[0]), size
    return frame.to_ndarray(format="rgb24"), size


def decode_frames(
    source: VideoSource,
    *,
    fps_list: Sequence[int | float] = (SIGLIP_FPS, SYNC_FPS),
    max_seconds: float = MAX_SECONDS,
    preprocess: bool = True,
) -> DecodedVideo:
    """Decode once and resample to every rate in ``fps_list`` with the official rule.

    Per rate, sample times are 0, 0+1/fps, (0+1/fps)+1/fps, ... (float64, accumulated, so the error
    matters at exact boundaries); each decoded frame is emitted while its timestamp is >= the next
    sample time, so frames repeat when upsampling and are dropped when downsampling. Frames before 0
    are ignored and decoding stops at the first frame later than ``max_seconds``. Timestamps count
    from the container's start when it is positive (MPEG-TS), see ``source.time_origin``.

    With ``preprocess`` (the default) each frame sampled at 8 fps is stored as the SigLIP2 input
    (``siglip_frames``) and each at 25 fps as the Synchformer input (``synchformer_frames``) as soon
    as it is decoded, so memory holds one full-resolution frame, not the clip (other rates stay at
    full resolution). ``preprocess=False`` keeps full-resolution frames at every rate.
    """
    label = _label(source)
    rates = list(dict.fromkeys(fps_list))
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"fps_list must hold positive rates, got {fps_list!r}")
    prep = _preprocessors(rates, preprocess)
    warnings: list[str] = []
    with _open(source) as container:
        stream = _video_stream(container, label)
        info = _info(container, stream)
        origin = time_origin(container)
        stream_duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
        stream.thread_type = "AUTO"
        span = min(info.duration if info.duration else max_seconds, max_seconds)
        buffers = {r: _Growable(int(math.ceil(span * r)) + 2) for r in rates}
        next_time = {r: 0.0 for r in rates}
        delta = {r: 1 / r for r in rates}
        size: tuple[int, int] | None = None  # (height, width) of the first frame
        errors: list[str] = []
        last_time = prev_time = last_span = None
        hit_limit = False
        n_decoded = 0
        for frame in _frames(container, stream, errors):
            t = _frame_time(frame, origin)
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
                stored = None
                while t >= next_time[r]:
                    if stored is None:
                        if rgb is None:
                            rgb, size = frame_rgb(frame, size)
                        stored = rgb if prep[r] is None else prep[r](rgb[None])[0]
                    buffers[r].append(stored)
                    next_time[r] += delta[r]
        single_image = _single_frame_image_error(container, label) if n_decoded == 1 else None
    if single_image is not None:
        raise single_image
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
    frames = {int(r) if float(r).is_integer() else r: buffers[r].array() for r in rates}
    return DecodedVideo(
        frames=frames, duration=duration, last_frame_time=last_time, info=info, warnings=warnings, preprocessed=preprocess
    )


def check_min_frames(frames: np.ndarray | torch.Tensor | int, *, min_frames: int = MIN_SYNC_FRAMES, fps: int = SYNC_FPS) -> None:
    """Refuse clips too short for one Synchformer window (the official crashes on them)."""
    n = frames if isinstance(frames, int) else len(frames)
    if n < min_frames:
        raise MediaError(
            f"video too short: {n} frame(s) at {fps} fps ({n / fps:.2f} s); the minimum is {min_frames} frames "
            f"at {fps} fps = {min_frames / fps:.2f} s; use a longer clip"
        )
