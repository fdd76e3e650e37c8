"""Length buckets: the ``"second"`` bucket trims clips to whole seconds so that similar lengths
share a denoising loop (see :mod:`foleyserve.runtime.batcher`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from foleyserve import media
from foleyserve.pipeline.pipeline import MAX_SECONDS


@dataclass
class _Trim:
    """What the "second" bucket cut off a clip, to restore in its result."""

    video_seconds: float
    warning: str


def _official_frame_count(seconds: int, fps: int, source_fps: int = 25) -> int:
    """Frames the official sampling rule yields at ``fps`` for a clip of exactly ``seconds`` s at
    ``source_fps``: same float accumulation as ``media.decode_frames``."""
    n, next_time, delta = 0, 0.0, 1 / fps
    for k in range(seconds * source_fps):
        t = k / source_fps
        while t >= next_time:
            n += 1
            next_time += delta
    return n


def trim_to_whole_seconds(decoded: media.DecodedVideo) -> tuple[media.DecodedVideo, _Trim | None]:
    """The "second" length bucket: keep the frames of the clip's first floor(duration) seconds.

    Returns the decoded video unchanged (and None) when there is nothing to trim."""
    seconds = math.floor(min(decoded.duration, MAX_SECONDS))
    f25, f8 = decoded.frames[media.SYNC_FPS], decoded.frames[media.SIGLIP_FPS]
    if seconds < 1:
        return decoded, None
    n25 = _official_frame_count(seconds, media.SYNC_FPS)
    n8 = _official_frame_count(seconds, media.SIGLIP_FPS)
    if len(f25) < n25 or (len(f25) == n25 and len(f8) <= n8):
        return decoded, None
    covered = n25 / media.SYNC_FPS
    # duration = what the audio covers, so write_result does not warn about the 15 s limit; the
    # real duration goes back into the result afterwards.
    trimmed = dataclasses.replace(decoded, frames={media.SYNC_FPS: f25[:n25], media.SIGLIP_FPS: f8[: min(len(f8), n8)]}, duration=covered)
    note = (
        f"the video is {decoded.duration:.2f} s long; sound was generated for its first {covered:.2f} s only, "
        f"because length_bucket='second' trims clips to whole seconds so that similar lengths share a batch; "
        f"the rest of the video is silent"
    )
    return trimmed, _Trim(video_seconds=decoded.duration, warning=note)
