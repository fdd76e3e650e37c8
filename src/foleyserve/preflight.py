"""Checks that run before any model loads, so bad input fails in milliseconds, not after minutes.

* Prompts: CLAP has a fixed position table, and a longer prompt cannot be encoded (the official
  code indexes past the table). Counting tokens needs only the tokenizer, which loads in well
  under a second; :class:`PromptChecker` counts with
  :func:`foleyserve.models.encoders.check_token_counts`, as the engine does, and raises the same
  :class:`~foleyserve.models.encoders.PromptTooLongError`.
* Videos: :func:`check_video` reads the header (one frame decoded, nothing more), says when the
  file is a still image (or a web page...), and checks the request budget (pixels per frame).
"""

from __future__ import annotations

import json
from pathlib import Path

from foleyserve import media
from foleyserve.config import MAX_VIDEO_PIXELS
from foleyserve.models.encoders import check_token_counts, clap_token_limit

# RoBERTa numbers real tokens from padding_idx + 1; laion/larger_clap_general's defaults.
_CLAP_POSITIONS = 514
_CLAP_PAD_ID = 1

class PromptChecker:
    """Counts prompt tokens for a model that is not loaded: only its tokenizer is (cheap).

    ``demo`` uses the demo model's tokenizer; otherwise CLAP's folder is found as the loader
    finds it (``clap_dir``, inside ``model_dir``, or the local Hugging Face cache).
    """

    def __init__(self, *, demo: bool, model_dir: str | Path | None = None, clap_dir: str | Path | None = None) -> None:
        if demo:
            from foleyserve.pipeline.demo import DEMO_CLAP_POSITIONS, demo_tokenizer

            self.tokenizer = demo_tokenizer()
            self.limit = clap_token_limit(DEMO_CLAP_POSITIONS, _CLAP_PAD_ID)
            return
        from foleyserve.models.encoders import load_clap_tokenizer
        from foleyserve.pipeline.model_dir import CLAP_REPO, ModelFolderError, find_hf_model

        path = find_hf_model(CLAP_REPO, Path(model_dir) if model_dir is not None else None, clap_dir)
        try:
            self.tokenizer = load_clap_tokenizer(path)
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelFolderError(
                f"cannot load the CLAP tokenizer from {path} ({first}); download it again with "
                f"`hf download {CLAP_REPO} --local-dir {path}`"
            ) from None
        text = config.get("text_config", config)
        self.limit = clap_token_limit(text.get("max_position_embeddings", _CLAP_POSITIONS), text.get("pad_token_id", _CLAP_PAD_ID))

    def check(self, prompt: str, negative_prompt: str) -> None:
        """Raise :class:`PromptTooLongError` if a prompt is longer than CLAP can encode."""
        check_token_counts(self.tokenizer, self.limit, prompt, negative_prompt)


def check_video(path: str | Path, *, max_pixels: int = MAX_VIDEO_PIXELS) -> media.VideoInfo:
    """Probe ``path`` (header and one frame) and check it is a video within the request budget.

    Raises :class:`~foleyserve.media.MediaError` with what is wrong and what to do: an image or
    other non-video, a clip clearly shorter than one Synchformer window, frames over ``max_pixels``.
    """
    p = Path(path)
    try:
        info = media.probe(p)
    except media.MediaError as err:
        # FFmpeg has the first say (a dark Y4M or a raw stream can look like text or an icon);
        # only a file it refuses is named by its first bytes.
        try:
            with open(p, "rb") as fh:
                head = fh.read(512)
        except OSError:
            raise err from None
        what = media.describe_non_video(head)
        if what is not None:
            raise media.MediaError(f"{p} is {what}, not a video; pass a video file such as MP4 (H.264), MOV, MKV or WebM") from None
        raise
    if info.duration is not None:
        # The exact count comes from decoding; refuse here only what is clearly too short, so a
        # clip at the boundary is left to the decoder's exact rule.
        frames = int(info.duration * media.SYNC_FPS + 0.5)
        if frames + 1 < media.MIN_SYNC_FRAMES:
            media.check_min_frames(frames)
    # No duration limit: decoding reads at most the first 15 s of any video.
    media.check_budget(info, max_pixels=max_pixels, max_seconds=None)
    return info
