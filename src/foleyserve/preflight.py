"""Checks that run before any model loads, so bad input fails in milliseconds, not after minutes.

* Prompts: CLAP has a fixed position table, and a longer prompt cannot be encoded (the official
  code indexes past the table). Counting tokens needs only the tokenizer, which loads in well
  under a second; :func:`check_prompts` counts exactly as
  :func:`foleyserve.models.encoders.encode_prompts` does and raises the same
  :class:`~foleyserve.models.encoders.PromptTooLongError`.
* Videos: :func:`check_video` reads the header (one frame decoded, nothing more), says when the
  file is a still image, and checks the decode budget: the decoder keeps every sampled frame at
  full resolution in host memory, so width x height x seconds is bounded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from foleyserve import media
from foleyserve.config import DECODE_FPS, HOST_MEMORY_SHARE, MAX_VIDEO_PIXELS
from foleyserve.models.encoders import PromptTooLongError

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine

# RoBERTa numbers real tokens from padding_idx + 1; laion/larger_clap_general's defaults.
_CLAP_POSITIONS = 514
_CLAP_PAD_ID = 1

# First bytes of still-image formats that people pass by mistake (a thumbnail, a frame grab).
_IMAGE_MAGIC: Sequence[tuple[bytes, int, str]] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WebP"),
)
_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}


def token_limit(text_config: Any) -> int:
    """Most tokens (``<s>`` and ``</s>`` included) a CLAP text config can encode."""
    return int(text_config.max_position_embeddings) - int(text_config.pad_token_id) - 1


def check_prompts(tokenizer: Any, limit: int, prompt: str, negative_prompt: str) -> None:
    """Raise :class:`PromptTooLongError` if either prompt has more than ``limit`` tokens."""
    # Tokenized together and padded, as encode_prompts does, so the counts are the same.
    lengths = tokenizer([negative_prompt, prompt], padding=True)["attention_mask"]
    counts = [sum(mask) for mask in lengths]
    too_long = [f"{name} prompt has {n} tokens" for name, n in zip(("negative", "positive"), counts) if n > limit]
    if too_long:
        raise PromptTooLongError(
            f"{' and '.join(too_long)}; CLAP accepts at most {limit} (including <s> and </s>): shorten it"
        )


def check_engine_prompts(engine: "Engine", prompt: str, negative_prompt: str) -> None:
    """:func:`check_prompts` with a loaded engine's tokenizer and CLAP (for the server, per request)."""
    c = engine.components
    check_prompts(c.tokenizer, token_limit(c.clap.config), prompt, negative_prompt)


class PromptChecker:
    """Counts prompt tokens for a model that is not loaded: only its tokenizer is (cheap).

    ``demo`` uses the demo model's tokenizer; otherwise CLAP's folder is found as the loader
    finds it (``clap_dir``, inside ``model_dir``, or the local Hugging Face cache).
    """

    def __init__(self, *, demo: bool, model_dir: str | Path | None = None, clap_dir: str | Path | None = None) -> None:
        if demo:
            from foleyserve.pipeline.demo import DEMO_CLAP_POSITIONS, demo_tokenizer

            self.tokenizer = demo_tokenizer()
            self.limit = DEMO_CLAP_POSITIONS - _CLAP_PAD_ID - 1
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
        self.limit = int(text.get("max_position_embeddings", _CLAP_POSITIONS)) - int(text.get("pad_token_id", _CLAP_PAD_ID)) - 1

    def check(self, prompt: str, negative_prompt: str) -> None:
        """Raise :class:`PromptTooLongError` if a prompt is longer than CLAP can encode."""
        check_prompts(self.tokenizer, self.limit, prompt, negative_prompt)


def image_kind(head: bytes) -> str | None:
    """The still-image format the first bytes of a file announce (PNG, JPEG, ...), if any."""
    describe = getattr(media, "describe_non_video", None)
    if describe is not None:  # media's own sniffing, where it has it
        found = describe(head)
        if found:
            return str(found)
    for magic, offset, name in _IMAGE_MAGIC:
        if head[offset : offset + len(magic)] == magic and (name != "WebP" or head.startswith(b"RIFF")):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
        return _IMAGE_BRANDS[head[8:12]]
    return None


def decode_bytes(info: media.VideoInfo, max_seconds: float = media.MAX_SECONDS) -> int:
    """Host bytes the decoder's frame buffers take for this video (RGB uint8 at every rate)."""
    span = min(info.duration or max_seconds, max_seconds)
    frames = sum(int(math.ceil(span * fps)) + 2 for fps in DECODE_FPS)
    return frames * info.width * info.height * 3


def available_memory() -> int | None:
    """Bytes of host memory available now (None where psutil cannot tell)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - any failure just means "unknown"; the budget check then skips memory
        return None


def check_video(
    path: str | Path,
    *,
    max_pixels: int = MAX_VIDEO_PIXELS,
    memory: int | None = None,
) -> media.VideoInfo:
    """Probe ``path`` (header and one frame) and check it is a video within the decode budget.

    Raises :class:`~foleyserve.media.MediaError` with what is wrong and what to do. ``memory``
    is the host memory the decode may use (default: a share of what is available now).
    """
    p = Path(path)
    if p.is_file():
        try:
            with open(p, "rb") as fh:
                head = fh.read(64)
        except OSError as e:
            raise media.MediaError(f"cannot read {p}: {e.strerror}; check its permissions") from None
        kind = image_kind(head)
        if kind is not None:
            raise media.MediaError(
                f"{p} is an image ({kind}), not a video; HunyuanVideo-Foley needs a video clip (at least 0.64 s)"
            )
    info = media.probe(p)
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise media.MediaError(
            f"{p} is {info.width}x{info.height} ({pixels / 1e6:.1f} MP per frame), more than the "
            f"{max_pixels / 1e6:.1f} MP this run decodes; scale it down (the model sees 512x512 and 224x224 frames anyway)"
        )
    budget = memory if memory is not None else available_memory()
    if budget is not None and memory is None:
        budget = int(budget * HOST_MEMORY_SHARE)
    need = decode_bytes(info)
    if budget is not None and need > budget:
        raise media.MediaError(
            f"decoding {p} ({info.width}x{info.height}, the first {min(info.duration or media.MAX_SECONDS, media.MAX_SECONDS):.1f} s) "
            f"needs about {need / 2**30:.1f} GiB of memory and {budget / 2**30:.1f} GiB is free; "
            f"scale the video down or free memory"
        )
    return info
