"""CLAP's audio tower (HTSAT), for scoring generated audio against its prompt.

The Foley pipeline reads only CLAP's text tower; laion/larger_clap_general's checkpoint also holds
the audio tower and both projections. ``ClapAudioModelWithProjection`` plus its
``ClapFeatureExtractor`` (48 kHz, 64-bin log-mel, 10 s) give the audio embedding; the score is its
cosine with the text tower's projected embedding, which is what ``ClapModel`` computes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import ClapAudioConfig, ClapAudioModelWithProjection, ClapFeatureExtractor

from foleyserve.models.encoders import _finish, _from_local, _local_dir, _random_model

__all__ = [
    "ClapAudioTower",
    "build_clap_audio",
    "clap_feature_extractor",
    "load_clap_audio",
    "tiny_clap_audio_config",
]


class ClapAudioTower(ClapAudioModelWithProjection):
    """``ClapAudioModelWithProjection`` that loads from a full ``ClapModel`` checkpoint (text tower skipped)."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale_[at]$"]


def tiny_clap_audio_config(projection_dim: int = 512, **overrides: Any) -> ClapAudioConfig:
    """A small HTSAT of the real layout (4 Swin stages, 256x256 mel image, window 8), for tests and the demo."""
    base = dict(
        patch_embeds_hidden_size=8, hidden_size=64, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
        projection_dim=projection_dim,
    )
    return ClapAudioConfig(**{**base, **overrides})


def build_clap_audio(
    config: ClapAudioConfig | None = None,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ClapAudioModelWithProjection:
    """CLAP audio tower with random weights, in eval mode (``config`` defaults to the tiny one)."""
    return _finish(_random_model(ClapAudioTower, config or tiny_clap_audio_config(), seed), dtype, device)


def clap_feature_extractor(model_dir: str | os.PathLike[str] | None, *, fused: bool = False) -> ClapFeatureExtractor:
    """The folder's feature extractor (library defaults without one), set to what the tower expects.

    The library default truncation is "fusion" (four stacked views), which only a fused tower
    reads; an unfused one such as larger_clap_general takes a single view ("rand_trunc", which is
    random only for audio over 10 s; :mod:`foleyserve.scoring` never hands it such audio).
    """
    path = None if model_dir is None else Path(model_dir)
    if path is not None and (path / "preprocessor_config.json").is_file():
        fe = ClapFeatureExtractor.from_pretrained(str(path), local_files_only=True)
    else:
        fe = ClapFeatureExtractor()
    if not fused and fe.truncation == "fusion":
        fe.truncation = "rand_trunc"
    return fe


def load_clap_audio(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[ClapFeatureExtractor, ClapAudioModelWithProjection]:
    """Feature extractor and audio tower from a local copy of laion/larger_clap_general, offline."""
    path = _local_dir(model_dir, "CLAP")
    model = _finish(_from_local(ClapAudioTower, path, dtype), dtype, device)
    return clap_feature_extractor(path, fused=bool(model.config.enable_fusion)), model
