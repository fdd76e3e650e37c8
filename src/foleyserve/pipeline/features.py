"""The feature stage: SigLIP2 frames (8 fps), Synchformer segments (25 fps) and CLAP text.

Each encoder runs in chunks so memory stays bounded on long clips; the results are exactly what
the official ``feature_process`` hands to the denoiser.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from foleyserve import media
from foleyserve.models.encoders import encode_frames_siglip, encode_prompts


@dataclass
class VisualFeatures:
    siglip: torch.Tensor  # [1, T8, 768]
    sync: torch.Tensor  # [1, 8*S, 768]
    frames_25fps: int

    @property
    def audio_seconds(self) -> float:
        # The official rule: audio covers the 25-fps frames, one frame = 1/25 s.
        return self.frames_25fps / 25

    @property
    def latent_length(self) -> int:
        # Same float expression as the official (audio_len_in_s * 50, truncated).
        return int(self.audio_seconds * 50)


@dataclass
class TextFeatures:
    text: torch.Tensor  # [1, L, 768] the prompt
    uncond: torch.Tensor  # [1, L, 768] the negative prompt, padded to the same L


def encoder_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (CPU too); None: no autocast (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def siglip_features(
    model: torch.nn.Module,
    frames: np.ndarray,
    *,
    device: torch.device,
    chunk: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """[T, H, W, 3] uint8 frames at 8 fps -> [1, T, D] pooled SigLIP2 features (fp32)."""
    out = []
    for start in range(0, len(frames), chunk):
        pixels = media.siglip_pixels(frames[start : start + chunk]).to(device)
        # A stage run outside torch (an exported graph, foleyserve.export.backend) offers encode_pixels.
        encode = getattr(model, "encode_pixels", None)
        feats = encode(pixels) if encode is not None else encode_frames_siglip(model, pixels, batch_size=chunk)
        out.append(feats.float())
        if progress is not None:
            progress(min(start + chunk, len(frames)), len(frames))
    return torch.cat(out, 0).unsqueeze(0)


@torch.no_grad()
def sync_features(
    model: torch.nn.Module,
    frames: np.ndarray,
    *,
    device: torch.device,
    chunk: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[T, H, W, 3] uint8 frames at 25 fps -> [1, 8*S, D] Synchformer features (fp32).

    The official runs this under fp16 autocast on CUDA; ``autocast_dtype`` reproduces that there
    (the engine passes it on CUDA only, unless ``encoder_precision`` asks for it).
    """
    pixels = media.synchformer_pixels(frames).unsqueeze(0)  # [1, T, 3, 224, 224] float32 on the host
    with encoder_autocast(device, autocast_dtype):
        feats = model.encode(pixels.to(device), batch_size=chunk)
    return feats.float()


@torch.no_grad()
def text_features(tokenizer, model: torch.nn.Module, prompt: str, negative_prompt: str, *, device: torch.device) -> TextFeatures:
    text, uncond = encode_prompts(tokenizer, model, negative_prompt, prompt, device=device)
    return TextFeatures(text=text.float(), uncond=uncond.float())
