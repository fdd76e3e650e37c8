"""Text to audio: a request without a video, only a duration and a prompt.

The model has a learned "no video" already: the unconditional CFG branch replaces both visual
streams by ``empty_clip_feat`` / ``empty_sync_feat`` broadcast over the clip's SigLIP2 (8 fps) and
Synchformer (8 tokens per 16-frame window, stride 8) token counts (``FoleyDiT.empty_visual``, as the
official ``get_empty_clip_sequence`` / ``get_empty_sync_sequence``). A text-only request uses those
same features for its *conditional* branch too, at the token counts a video of that duration would
give (:func:`foleyserve.pipeline.lengths.clip_lengths`), so only the prompt pair differs between the
two CFG branches. Everything downstream (batching, the DAC, writing) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from foleyserve import media
from foleyserve.pipeline.features import VisualFeatures
from foleyserve.pipeline.lengths import clip_lengths

# Synchformer needs 16 frames at 25 fps: the shortest clip the model takes.
MIN_SECONDS = 0.64
MAX_SECONDS = 15.0


@dataclass
class NoVideoClip(media.DecodedVideo):
    """What "decoding" a text-only request gives: no frames, the length the audio should have.

    ``duration`` (the video's length) is 0, so results report ``video_seconds == 0`` and no
    warning about audio shorter than the video."""

    seconds: float = 0.0


def no_video_clip(seconds: float) -> NoVideoClip:
    """The frame-less stand-in for a video of ``seconds`` (the requested audio length)."""
    info = media.VideoInfo(
        duration=None, frame_rate=Fraction(25), fps=25.0, num_frames=0, width=0, height=0, has_video=False,
        has_audio=False, audio_sample_rate=None, audio_channels=None, container="none", video_codec=None, audio_codec=None,
    )
    return NoVideoClip(frames={}, duration=0.0, last_frame_time=0.0, info=info, seconds=float(seconds))


@torch.no_grad()
def empty_visual(dit: torch.nn.Module, seconds: float, device: torch.device) -> VisualFeatures:
    """The learned empty visual features for a clip of ``seconds``, in fp32 (the dtype ``cfg_inputs``
    promotes the empty vectors to when it concatenates them with real features)."""
    n = clip_lengths(seconds)
    clip, sync = dit.empty_visual(1, n["visual_len"], n["sync_len"])  # type: ignore[operator]
    return VisualFeatures(
        siglip=clip.detach().to(device, torch.float32).contiguous(),
        sync=sync.detach().to(device, torch.float32).contiguous(),
        frames_25fps=n["frames_25fps"],
    )


def clip_key(decoded: media.DecodedVideo) -> str:
    """A cache key for the visual input: the frames' hash, or the length of a text-only clip."""
    if isinstance(decoded, NoVideoClip):
        return f"no-video/{clip_lengths(decoded.seconds)['frames_25fps']}"
    from foleyserve.runtime.cache import frames_key

    return frames_key(decoded)
