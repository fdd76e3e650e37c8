"""ONNX export of the encoders: SigLIP2 vision (frames dynamic), Synchformer's visual branch
(segments dynamic) and CLAP text (batch and tokens dynamic).

Both go through torch's dynamo exporter as the DAC decoder does, with transformers' default
attention implementation (SDPA): on torch 2.13 / transformers 5 neither needed ``dynamo=False``
nor an ``attn_implementation="eager"`` switch, and both reproduce torch at ~1e-7 rel-L2.

The graphs hold exactly what the pipeline consumes: ``encode_frames_siglip`` reads the vision
tower's ``pooler_output`` and ``encode_prompts`` reads CLAP's ``last_hidden_state`` (all
positions, padding included, which is why the attention mask is an input and the hidden states
of ``<pad>`` positions are part of the parity).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from foleyserve.export.manifest import StageEntry
from foleyserve.export.onnx_export import DEFAULT_OPSET, _export, stage_entry, with_parity

SIGLIP_STAGE = "siglip_vision"
SYNC_STAGE = "synchformer"
CLAP_STAGE = "clap_text"
# Batch 2 at export (torch.export specialises a size-1 axis to the constant 1); parity at other
# frame counts, 1 included, so a graph that baked the example's frame count in would fail.
SIGLIP_EXPORT_FRAMES = 2
SIGLIP_PARITY_FRAMES: tuple[int, ...] = (1, 3)
_MAX_FRAMES = 1 << 16  # an hour of video at 8 fps, sent as one batch: far past any request
# (batch, tokens). The export example pads its shorter row, so the mask path is exercised; the
# parity shapes differ from it in both axes and include a batch of 1 and an odd token count.
CLAP_EXPORT_SHAPE = (2, 12)
CLAP_PARITY_SHAPES: tuple[tuple[int, int], ...] = ((1, 5), (3, 29))
_MAX_CLAP_BATCH = 64
# Windows of 16 frames at 25 fps, 8 apart: 2 at export, parity at 1 and 3 (a chunk of the
# pipeline's sync_chunk=8 is the common case at run time).
SYNC_EXPORT_SEGMENTS = 2
SYNC_PARITY_SEGMENTS: tuple[int, ...] = (1, 3)
_MAX_SEGMENTS = 1 << 14


class _SiglipPooledGraph(nn.Module):
    """pixel_values [N, 3, S, S] -> image_features [N, hidden]: what encode_frames_siglip returns."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixel_values).pooler_output


class _ClapHiddenGraph(nn.Module):
    """(input_ids, attention_mask) [B, L] -> last_hidden_state [B, L, hidden]: what encode_prompts reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _SyncSegmentsGraph(nn.Module):
    """segments [n, 16, 3, H, W] -> features [n, 8, D]: SynchformerVisual.forward with S = 1 folded in.

    ``encode_windows`` hands ``[n, 1, 16, 3, H, W]``; the singleton axis is dropped outside the
    graph, since torch.export would specialise a size-1 axis anyway.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        return self.visual(segments.unsqueeze(1)).squeeze(1)


def clap_max_tokens(model: nn.Module) -> int:
    """The most tokens (``<s>`` and ``</s>`` included) CLAP's position table holds; the graph's token-axis bound."""
    from foleyserve.models.encoders import _max_tokens_of

    return _max_tokens_of(model)


def synthetic_clap_tokens(
    lengths: Iterable[int], config: Any, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A RoBERTa-style padded batch: ``<s> ids </s>`` per row, right-padded with ``<pad>`` to the longest.

    Shaped as the tokenizer's ``padding=True`` output is, without needing a tokenizer at export time.
    """
    lengths = [int(n) for n in lengths]
    if min(lengths) < 2:
        raise ValueError("each row needs at least <s> and </s>")
    width = max(lengths)
    pad, bos, eos = int(config.pad_token_id), int(config.bos_token_id), int(config.eos_token_id)
    ids = torch.full((len(lengths), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(lengths), width), dtype=torch.int64)
    # Ids above the special tokens (0..4 in RoBERTa's vocabulary), so no row has a stray <pad> inside.
    low = max(pad, bos, eos) + 3
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = bos, eos
        ids[row, 1 : n - 1] = torch.randint(low, int(config.vocab_size), (n - 2,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def _row_lengths(batch: int, tokens: int) -> list[int]:
    # The first row is the longest (sets the width); the others are shorter, so padding is present.
    return [tokens] + [max(2, tokens - 3 * (i + 1)) for i in range(batch - 1)]


def export_siglip_vision(
    model: nn.Module,
    export_dir: str | Path,
    *,
    source: str,
    source_hashes: Mapping[str, str],
    export_frames: int = SIGLIP_EXPORT_FRAMES,
    parity_frames: Iterable[int] = SIGLIP_PARITY_FRAMES,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
) -> StageEntry:
    """Export the SigLIP2 vision tower (frame count dynamic) and measure its ORT parity.

    ``model`` is a ``SiglipVisionModel`` (or a full ``SiglipModel``, whose vision tower is taken)
    in fp32 eval mode; input ``pixel_values`` ``[frames, 3, S, S]`` (S from its config: 512 for
    the real model), output ``image_features`` ``[frames, hidden]``. Parity is ORT CPU fp32 vs
    the tower in torch fp32 at ``parity_frames``, none of which may be the export count.
    """
    from transformers import SiglipModel

    tower = model.vision_model if isinstance(model, SiglipModel) else model
    parity_frames = [int(n) for n in parity_frames]
    if export_frames in parity_frames:
        raise ValueError("parity must be measured at frame counts other than the export one")
    cfg = tower.config
    size, channels = int(cfg.image_size), int(cfg.num_channels)
    out_dir = Path(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{SIGLIP_STAGE}.onnx"
    # A copy: the caller's model keeps its dtype and device.
    graph = _SiglipPooledGraph(copy.deepcopy(tower).float().cpu()).eval()
    gen = torch.Generator().manual_seed(seed)

    def frames(n: int) -> torch.Tensor:
        return torch.rand(n, channels, size, size, generator=gen) * 2 - 1  # the [-1, 1] the encoder expects

    t0 = time.perf_counter()
    _export(
        graph, (frames(export_frames),), path, input_names=["pixel_values"], output_names=["image_features"],
        opset=opset, exporter=exporter, dynamic={"pixel_values": {0: ("frames", 1, _MAX_FRAMES)}},
    )
    entry = stage_entry(
        SIGLIP_STAGE, path, opset=opset, exporter=exporter, source=source, source_hashes=source_hashes,
        export_seconds=time.perf_counter() - t0,
        extra={"image_size": size, "hidden_size": int(cfg.hidden_size), "export_shape": [export_frames, channels, size, size]},
    )
    def cases():
        for n in parity_frames:
            x = frames(n)
            with torch.no_grad():
                yield f"{n}x{channels}x{size}x{size}", {"pixel_values": x.numpy()}, graph(x).numpy()

    return with_parity(entry, out_dir, cases())


def export_synchformer(
    model: nn.Module,
    export_dir: str | Path,
    *,
    source: str,
    source_hashes: Mapping[str, str],
    export_segments: int = SYNC_EXPORT_SEGMENTS,
    parity_segments: Iterable[int] = SYNC_PARITY_SEGMENTS,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
) -> StageEntry:
    """Export Synchformer's visual branch (segment count dynamic) and measure its ORT parity.

    ``model`` is a :class:`~foleyserve.models.synchformer.SynchformerVisual` in fp32; input
    ``segments`` ``[n, 16, 3, 224, 224]`` (windows already normalised, as
    :func:`~foleyserve.models.synchformer.encode_windows` cuts them), output ``features``
    ``[n, 8, D]``. Windowing stays outside the graph and is shared with torch, so both cut a clip
    identically. Parity is ORT CPU fp32 vs torch fp32 at ``parity_segments``.
    """
    from foleyserve.models.synchformer import INPUT_SIZE, SEGMENT_FRAMES

    parity_segments = [int(n) for n in parity_segments]
    if export_segments in parity_segments:
        raise ValueError("parity must be measured at segment counts other than the export one")
    out_dir = Path(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{SYNC_STAGE}.onnx"
    graph = _SyncSegmentsGraph(copy.deepcopy(model).float().cpu()).eval()
    gen = torch.Generator().manual_seed(seed)

    def segments(n: int) -> torch.Tensor:
        return torch.randn(n, SEGMENT_FRAMES, 3, INPUT_SIZE, INPUT_SIZE, generator=gen)

    t0 = time.perf_counter()
    _export(
        graph, (segments(export_segments),), path, input_names=["segments"], output_names=["features"],
        opset=opset, exporter=exporter, dynamic={"segments": {0: ("segments", 1, _MAX_SEGMENTS)}},
    )
    entry = stage_entry(
        SYNC_STAGE, path, opset=opset, exporter=exporter, source=source, source_hashes=source_hashes,
        export_seconds=time.perf_counter() - t0,
        extra={"embed_dim": int(model.embed_dim),
               "export_shape": [export_segments, SEGMENT_FRAMES, 3, INPUT_SIZE, INPUT_SIZE]},
    )
    def cases():
        for n in parity_segments:
            x = segments(n)
            with torch.no_grad():
                yield f"{n}x{SEGMENT_FRAMES}x3x{INPUT_SIZE}x{INPUT_SIZE}", {"segments": x.numpy()}, graph(x).numpy()

    return with_parity(entry, out_dir, cases())


def export_clap_text(
    model: nn.Module,
    export_dir: str | Path,
    *,
    source: str,
    source_hashes: Mapping[str, str],
    export_shape: tuple[int, int] = CLAP_EXPORT_SHAPE,
    parity_shapes: Iterable[tuple[int, int]] = CLAP_PARITY_SHAPES,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
) -> StageEntry:
    """Export the CLAP text model (batch and token count dynamic) and measure its ORT parity.

    ``model`` is a ``ClapTextModelWithProjection`` in fp32 eval mode; inputs ``input_ids`` and
    ``attention_mask`` (int64 ``[batch, tokens]``, as the tokenizer gives them with
    ``padding=True``), output ``last_hidden_state`` ``[batch, tokens, hidden]``; the projection,
    unused by the pipeline, is not in the graph. Parity is ORT CPU fp32 vs torch fp32 on padded
    batches at ``parity_shapes`` (batch, tokens), none of which may share a size with the export one.
    """
    if model.training:
        raise ValueError("the CLAP model is in training mode (dropout would be exported); call model.eval()")
    parity_shapes = [tuple(s) for s in parity_shapes]
    if any(b == export_shape[0] or n == export_shape[1] for b, n in parity_shapes):
        raise ValueError("parity must be measured at batch sizes and token counts other than the export ones")
    cfg = model.config
    max_tokens = clap_max_tokens(model)
    out_dir = Path(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{CLAP_STAGE}.onnx"
    graph = _ClapHiddenGraph(copy.deepcopy(model).float().cpu()).eval()
    gen = torch.Generator().manual_seed(seed)
    example = synthetic_clap_tokens(_row_lengths(*export_shape), cfg, gen)
    axes = {0: ("batch", 1, _MAX_CLAP_BATCH), 1: ("tokens", 1, max_tokens)}
    t0 = time.perf_counter()
    _export(
        graph, example, path, input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        opset=opset, exporter=exporter, dynamic={"input_ids": axes, "attention_mask": axes},
    )
    entry = stage_entry(
        CLAP_STAGE, path, opset=opset, exporter=exporter, source=source, source_hashes=source_hashes,
        export_seconds=time.perf_counter() - t0,
        extra={"hidden_size": int(cfg.hidden_size), "max_tokens": max_tokens, "pad_token_id": int(cfg.pad_token_id),
               "export_shape": list(export_shape)},
    )
    def cases():
        for batch, tokens in parity_shapes:
            ids, mask = synthetic_clap_tokens(_row_lengths(batch, tokens), cfg, gen)
            with torch.no_grad():
                yield f"{batch}x{tokens}", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, graph(ids, mask).numpy()

    return with_parity(entry, out_dir, cases())


__all__ = [
    "CLAP_STAGE",
    "SIGLIP_STAGE",
    "SYNC_STAGE",
    "clap_max_tokens",
    "export_clap_text",
    "export_siglip_vision",
    "export_synchformer",
    "synthetic_clap_tokens",
]
