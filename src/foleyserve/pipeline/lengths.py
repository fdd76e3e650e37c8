"""Token counts of a clip of a given duration under the official length rules.

What a warm-up needs to build the shapes of a bucket without a video: the 25 fps frame count, the
latent length (``frames / 25 * 50``, truncated as the official code does), SigLIP2's 8 fps frames
and Synchformer's 8 tokens per 16-frame window with stride 8.
"""

from __future__ import annotations


def clip_lengths(seconds: float) -> dict[str, int]:
    """``{"frames_25fps", "audio_len", "visual_len", "sync_len"}`` for a clip of ``seconds``."""
    frames25 = int(round(seconds * 25))
    if frames25 < 16:
        raise ValueError(f"a {seconds} s clip has fewer than 16 frames at 25 fps; Synchformer needs 16")
    return {
        "frames_25fps": frames25,
        "audio_len": int(frames25 / 25 * 50),
        "visual_len": int(round(seconds * 8)),
        "sync_len": 8 * ((frames25 - 16) // 8 + 1),
    }
