"""One decode pass for many overlapping time windows of a long video (full-length generation).

Each window gets exactly the frames a standalone clip of that time range would get from
:func:`~foleyserve.media.decode.decode_frames`: the window's clock starts at its own start, and the
official sampling rule (sample times 0, 1/fps, ... accumulated in float64; a frame is emitted while
its time is >= the next sample time) runs on that clock over the frames with start <= t < end. A
window is handed out as soon as decoding passes its end and is then forgotten here, so memory holds
the preprocessed frames of the windows still open (two when the overlap is under half a window),
whatever the video's length.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np

from foleyserve.media.decode import DecodedVideo, _frame_time, _Growable, _preprocessors, frame_rgb
from foleyserve.media.source import (
    SIGLIP_FPS, SYNC_FPS, MediaError, VideoSource, _frames, _header_duration, _label, _no_frames_error, _open,
    _video_stream, time_origin,
)
from foleyserve.media.source import _info as _stream_info


def video_seconds(source: VideoSource) -> float:
    """The video stream's length in seconds: the header's, else the last packet's end (demux only)."""
    label = _label(source)
    with _open(source) as container:
        stream = _video_stream(container, label)
        duration = _header_duration(container, stream)
        if duration is not None:
            return duration
        origin = time_origin(container)
        end = None
        for packet in container.demux(stream):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or packet.time_base is None:
                continue
            t = float(ts * packet.time_base - origin) + float((packet.duration or 0) * packet.time_base)
            end = t if end is None else max(end, t)
    if end is None:
        raise _no_frames_error(label, [])
    return end


def _exact_time(frame: av.VideoFrame, origin: Fraction) -> Fraction | None:
    """A frame's time since ``origin`` as an exact fraction, so window edges on frame times are exact."""
    if frame.pts is None or frame.time_base is None:
        return None
    return frame.pts * Fraction(frame.time_base) - origin


class _Open:
    """The sampling state of one window that decoding has reached but not yet passed."""

    def __init__(self, start: Fraction, end: Fraction, rates: list[int | float]) -> None:
        self.start, self.end = start, end
        span = float(end - start)
        self.buffers = {r: _Growable(int(math.ceil(span * r)) + 2) for r in rates}
        self.next_time = {r: 0.0 for r in rates}
        self.last_time: float | None = None
        self.last_span: float | None = None
        self.n_frames = 0


def decode_windows(
    source: VideoSource,
    windows: Sequence[tuple[Fraction, Fraction]],
    *,
    fps_list: Sequence[int | float] = (SIGLIP_FPS, SYNC_FPS),
    preprocess: bool = True,
) -> Iterator[DecodedVideo]:
    """Yield one :class:`DecodedVideo` per ``(start, end)`` window (seconds, sorted by start), in order.

    A window's frames are those of a standalone clip of ``[start, end)`` decoded by ``decode_frames``
    (times are shifted on the integer timestamps, so a frame-aligned start gives bit-equal frame
    times). Its ``duration`` is ``end - start`` and ``last_frame_time`` is on the window's clock. A
    window the video ends before is yielded with no frames at all (``frames[fps]`` empty): the
    caller decides what silence means. Each decoded frame is converted and preprocessed once, however
    many windows share it.
    """
    if not windows:
        return
    label = _label(source)
    rates = list(dict.fromkeys(fps_list))
    prep = _preprocessors(rates, preprocess)
    order = sorted(range(len(windows)), key=lambda i: windows[i][0])
    if order != list(range(len(windows))):
        raise ValueError("windows must be sorted by start time")
    with _open(source) as container:
        stream = _video_stream(container, label)
        info = _stream_info(container, stream)
        origin = time_origin(container)
        stream.thread_type = "AUTO"
        errors: list[str] = []
        pending = list(windows)  # not reached yet
        live: list[_Open] = []
        done_count = 0
        size: tuple[int, int] | None = None
        prev_time = None
        n_decoded = 0
        for frame in _frames(container, stream, errors):
            t_abs = _frame_time(frame, origin)
            if t_abs is None:
                t_abs = (prev_time + 1 / info.fps) if (prev_time is not None and info.fps) else 0.0
            prev_time = t_abs
            n_decoded += 1
            exact = _exact_time(frame, origin)
            at = exact if exact is not None else Fraction(t_abs)
            # Windows the decoder has passed are complete: hand them out before touching this frame.
            while live and at >= live[0].end:
                yield _finish(live.pop(0), info, preprocess, errors)
                done_count += 1
            while pending and at >= pending[0][0]:
                live.append(_Open(*pending.pop(0), rates))
            if not live:
                if not pending:
                    break
                continue
            rgb = None
            shared: dict[int | float, np.ndarray] = {}
            span = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
            for w in live:
                # The window's own clock, shifted on integer ticks like a cut clip's timestamps.
                t = _frame_time(frame, origin + w.start)
                if t is None:
                    t = t_abs - float(w.start)
                if at < w.start or at >= w.end:
                    continue
                w.last_time, w.last_span = t, span
                w.n_frames += 1
                for r in rates:
                    while t >= w.next_time[r]:
                        if r not in shared:
                            if rgb is None:
                                rgb, size = frame_rgb(frame, size)
                            shared[r] = rgb if prep[r] is None else prep[r](rgb[None])[0]
                        w.buffers[r].append(shared[r])
                        w.next_time[r] += 1 / r
        if n_decoded == 0:
            raise _no_frames_error(label, errors)
        for w in live:
            yield _finish(w, info, preprocess, errors)
            done_count += 1
        for start, end in pending:  # the video ended before these began
            yield _finish(_Open(start, end, rates), info, preprocess, errors)
            done_count += 1
    if done_count != len(windows):  # pragma: no cover - every window is yielded exactly once above
        raise MediaError(f"{label}: internal error, {done_count} of {len(windows)} windows decoded")


def _finish(w: _Open, info, preprocess: bool, errors: list[str]) -> DecodedVideo:
    frames: dict[int | float, np.ndarray] = {}
    for r, buf in w.buffers.items():
        key = int(r) if float(r).is_integer() else r
        frames[key] = buf.array() if buf.data is not None else np.zeros((0, 0, 0, 3), np.uint8)
    warnings = [f"{len(errors)} damaged packet(s) skipped while decoding ({errors[0]})"] if errors else []
    return DecodedVideo(
        frames=frames,  # type: ignore[arg-type]
        duration=float(w.end - w.start),
        last_frame_time=w.last_time if w.last_time is not None else 0.0,
        info=info,
        warnings=warnings,
        preprocessed=preprocess,
    )
