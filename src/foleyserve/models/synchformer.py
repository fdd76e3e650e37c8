"""Synchformer visual branch (a MotionFormer ViT with divided space-time attention).

HunyuanVideo-Foley only runs the video feature extractor of Synchformer: 16 frames at 25 fps
(0.64 s) become 8 tokens, and a clip is covered by windows of 16 frames taken every 8 frames.
The official checkpoint also holds an audio AST branch and a sync-classification head; they are
never executed, so this module leaves them out and :func:`split_synchformer_state_dict` sets
their weights aside.

Parameter names match the official ones under ``vfeat_extractor.`` so the released
``synchformer_state_dict.pth`` loads with ``strict=True`` after the split.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEGMENT_FRAMES = 16
SEGMENT_STRIDE = 8
SYNC_FPS = 25
INPUT_SIZE = 224

_VISUAL_PREFIX = "vfeat_extractor."


class _Projection(nn.Module):
    """Holder that gives a conv the official ``<name>.proj`` key."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.proj = conv


class DividedAttention(nn.Module):
    """Self-attention restricted to one axis of the (frame, patch) grid, plus a global CLS token.

    Patch tokens attend within their group (the 8 frames of one spatial site for temporal
    attention, the patches of one frame for spatial attention), with the CLS key/value prepended to
    every group. The CLS query is not grouped: it attends to the full sequence.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, frames: int, patches: int, over_time: bool) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)

        # The official code multiplies q by 1/sqrt(head_dim) before q @ k^T; SDPA's default scale is
        # the same factor applied inside the kernel, which only moves the rounding by an ulp.
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)

        def grid(t: torch.Tensor) -> torch.Tensor:
            g = t[:, :, 1:].unflatten(2, (frames, patches))  # [B, h, F, N, dh]
            return g.transpose(2, 3) if over_time else g

        qg, kg, vg = grid(q), grid(k), grid(v)
        groups = qg.shape[2]
        cls_k = k[:, :, :1].unsqueeze(2).expand(-1, -1, groups, -1, -1)
        cls_v = v[:, :, :1].unsqueeze(2).expand(-1, -1, groups, -1, -1)
        kg = torch.cat((cls_k, kg), dim=3)
        vg = torch.cat((cls_v, vg), dim=3)

        # Folding the groups into the head axis keeps SDPA on its 4-D fast path.
        out = F.scaled_dot_product_attention(qg.flatten(1, 2), kg.flatten(1, 2), vg.flatten(1, 2))
        out = out.unflatten(1, (heads, groups))
        if over_time:
            out = out.transpose(2, 3)
        out = torch.cat((cls_out, out.flatten(2, 3)), dim=2)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """Pre-norm block: temporal attention, then spatial attention, then MLP.

    The official names do not follow execution order: ``norm3`` feeds the temporal attention
    (``timeattn``), ``norm1`` the spatial one (``attn``), ``norm2`` the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, num_heads)
        self.timeattn = DividedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, patches, over_time=True)
        x = x + self.attn(self.norm1(x), frames, patches, over_time=False)
        return x + self.mlp(self.norm2(x))


class _PackedInProjAttention(nn.Module):
    """Parameters laid out like ``nn.MultiheadAttention`` (``in_proj_*``, ``out_proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def first_query(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output for position 0 only, with keys/values from the whole sequence."""
        batch, length, dim = x.shape
        heads = self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(x[:, :1], w[:dim], b[:dim]).view(batch, 1, heads, -1).transpose(1, 2)
        kv = F.linear(x, w[dim:], b[dim:]).view(batch, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.out_proj(out.transpose(1, 2).reshape(batch, 1, dim))


class SpatialAggregation(nn.Module):
    """Norm-first transformer encoder layer with its own CLS token, reduced to that token's output.

    Officially a full ``nn.TransformerEncoderLayer`` (GELU, eps 1e-6, no dropout at inference) runs
    over [CLS, patches] and everything but the CLS row is discarded. Since every op after the
    attention is per token, computing only the CLS query gives the same values for far less work.
    """

    def __init__(self, dim: int, num_heads: int, ff_dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = _PackedInProjAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D]."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        cls = x[:, :1] + self.self_attn.first_query(self.norm1(x))
        cls = cls + self.linear2(F.gelu(self.linear1(self.norm2(cls))))
        return cls[:, 0]


class MotionFormer(nn.Module):
    """The ViT under ``vfeat_extractor``: [B, 3, 16, 224, 224] -> [B, 8, D]."""

    def __init__(
        self,
        embed_dim: int = 768,
        num_heads: int = 12,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        img_size: int = INPUT_SIZE,
        patch_size: int = 16,
        temporal_patch: int = 2,
        temporal_tokens: int = 8,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.temporal_patch = temporal_patch
        self.temporal_tokens = temporal_tokens
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, temporal_tokens, embed_dim))
        # Never executed (the 3-D tubelet embed replaces it), but the checkpoint carries its weights
        # and strict loading needs a home for them.
        self.patch_embed = _Projection(nn.Conv2d(3, embed_dim, patch_size, stride=patch_size))
        tubelet = (temporal_patch, patch_size, patch_size)
        self.patch_embed_3d = _Projection(nn.Conv3d(3, embed_dim, tubelet, stride=tubelet))
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.spatial_attn_agg = SpatialAggregation(embed_dim, num_heads, int(mlp_ratio * embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T / temporal_patch, D]."""
        tokens = self.patch_embed_3d.proj(x)  # [B, D, t, h, w]
        batch, dim, frames, gh, gw = tokens.shape
        if frames != self.temporal_tokens or gh * gw != self.num_patches:
            side = self.grid * self.patch_size
            raise ValueError(
                f"expected {self.temporal_tokens * self.temporal_patch} frames of {side}x{side} "
                f"(a {self.temporal_tokens}x{self.grid}x{self.grid} token grid), got input {tuple(x.shape)}"
            )
        tokens = tokens.flatten(2).transpose(1, 2)  # frame-major: index = f * N + n

        # Spatial table shared by all frames plus one temporal vector per frame; the CLS token only
        # gets the spatial table's slot 0.
        patch_pos = (self.pos_embed[:, 1:].unsqueeze(1) + self.temp_embed.unsqueeze(2)).flatten(1, 2)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat((cls, tokens + patch_pos), dim=1)

        for block in self.blocks:
            x = block(x, frames, self.num_patches)

        # The backbone's CLS token is dropped; the aggregator pools each frame with its own CLS.
        x = self.norm(x[:, 1:])
        x = self.spatial_attn_agg(x.reshape(batch * frames, self.num_patches, dim))
        return x.view(batch, frames, dim)


class SynchformerVisual(nn.Module):
    """Official ``Synchformer`` with only its visual extractor (key prefix ``vfeat_extractor.``)."""

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, depth: int = 12) -> None:
        super().__init__()
        self.vfeat_extractor = MotionFormer(embed_dim=embed_dim, num_heads=num_heads, depth=depth)

    @property
    def embed_dim(self) -> int:
        return self.vfeat_extractor.embed_dim

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        """[B, S, 16, 3, 224, 224] (frame axis before channels) -> [B, S, 8, D]."""
        if segments.ndim != 6:
            raise ValueError(f"expected [B, S, T, C, H, W] segments, got shape {tuple(segments.shape)}")
        b, s = segments.shape[:2]
        weight = self.vfeat_extractor.patch_embed_3d.proj.weight
        x = segments.to(weight.dtype).permute(0, 1, 3, 2, 4, 5).flatten(0, 1)  # [B*S, C, T, H, W]
        out = self.vfeat_extractor(x)
        return out.view(b, s, *out.shape[1:])

    def encode(self, frames: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Sync features of whole clips: [B, T, 3, 224, 224] at 25 fps -> [B, 8 * S, D].

        S = (T - 16) // 8 + 1 windows of 16 frames with stride 8; frames after the last full window
        are not seen. ``batch_size`` caps how many windows run through the network at once (all of
        them when None). Gradient tracking is left to the caller (use ``torch.inference_mode()``).
        """
        return encode_windows(self, frames, batch_size)


def encode_windows(
    run: "Callable[[torch.Tensor], torch.Tensor]", frames: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """:meth:`SynchformerVisual.encode` for any ``run``: segments [n, 1, 16, 3, H, W] -> [n, 1, 8, D].

    The windowing lives here, apart from the network, so an exported Synchformer (an ONNX graph of
    ``forward``) cuts clips into exactly the same windows as the torch one.
    """
    if frames.ndim != 5:
        raise ValueError(f"expected frames [B, T, 3, H, W], got shape {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    if t < SEGMENT_FRAMES:
        raise ValueError(
            f"Synchformer needs at least {SEGMENT_FRAMES} frames at {SYNC_FPS} fps "
            f"({SEGMENT_FRAMES / SYNC_FPS:.2f} s of video), got {t}"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size}")
    s = (t - SEGMENT_FRAMES) // SEGMENT_STRIDE + 1
    # A strided view [B, S, 3, H, W, 16]; windows are copied only chunk by chunk below.
    windows = frames.unfold(1, SEGMENT_FRAMES, SEGMENT_STRIDE)
    order = [(i, j) for i in range(b) for j in range(s)]
    step = len(order) if batch_size is None else batch_size
    outputs = []
    for start in range(0, len(order), step):
        chunk = torch.stack([windows[i, j] for i, j in order[start : start + step]])
        chunk = chunk.permute(0, 4, 1, 2, 3).unsqueeze(1)  # [n, 1, 16, 3, H, W]
        outputs.append(run(chunk))
    out = torch.cat(outputs, dim=0)  # [B*S, 1, 8, D], batch-major like the official rearrange
    return out.reshape(b, s * out.shape[2], out.shape[3])


def build_synchformer_visual(embed_dim: int = 768, num_heads: int = 12, depth: int = 12) -> SynchformerVisual:
    """The released Synchformer uses the defaults (ViT-B: 768, 12 heads, 12 blocks)."""
    return SynchformerVisual(embed_dim=embed_dim, num_heads=num_heads, depth=depth)


def split_synchformer_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the ``vfeat_extractor.*`` entries of a full Synchformer state dict.

    Returns (visual state dict, ignored keys). The ignored keys are the audio AST branch and the
    sync head (``afeat_extractor.*``, ``vproj``, ``aproj``, ``transformer.*``), which the Foley
    pipeline never runs; they are returned so callers can report what was skipped.
    """
    visual: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in sd.items():
        if key.startswith(_VISUAL_PREFIX):
            visual[key] = value
        else:
            ignored.append(key)
    return visual, ignored


def preprocess_frames_uint8(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> float32 [T, 3, 224, 224] in [-1, 1].

    Mirrors the official transform chain for frames that are already 224x224, where its bicubic
    resize and centre crop return the input unchanged: scale by 1/255, then Normalize(0.5, 0.5).
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        raise NotImplementedError(
            f"only {INPUT_SIZE}x{INPUT_SIZE} frames are supported so far (bicubic resize + centre crop "
            f"is not implemented), got {x.shape[2]}x{x.shape[1]}"
        )
    # Same op order as torchvision's ToDtype(scale=True) + Normalize, for identical rounding.
    x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).mul_(1.0 / 255)
    return x.sub_(0.5).div_(0.5)
