"""Building blocks of the MMDiT denoiser.

Parameter names follow the official checkpoint (``linear_1``, ``mlp.0``, ``w1``...), so that the
official state dict loads strictly. Numerics follow the official module op for op where that
matters for bit-level agreement (fp32 RMSNorm, RoPE applied in fp32 and cast back, the sinusoid's
cos-then-sin order).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class QKNorm(nn.Module):
    """RMSNorm over the head dim, computed in fp32 and cast back before the gain is applied.

    The official triple blocks use this custom norm (eps 1e-6); the order "normalise in fp32, cast
    to the input dtype, then multiply by the gain" is kept because it changes low bits in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Modulation(nn.Module):
    """SiLU -> Linear(d, factor*d): the adaLN shift/scale/gate producer (key ``<name>.linear``)."""

    def __init__(self, hidden_size: int, factor: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, factor * hidden_size, bias=True)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(c))


class MLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with bias-free linears (the official ``visual_proj``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TokenConv1d(nn.Conv1d):
    """A Conv1d over the token axis of a token-major ``[B, L, C]`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def conv_mlp_hidden(hidden: int, multiple_of: int = 256) -> int:
    """The official ConvMLP shrinks its nominal hidden size to 2/3 and rounds up to ``multiple_of``."""
    h = int(2 * hidden / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class ConvMLP(nn.Module):
    """SwiGLU whose three projections are bias-free Conv1d over tokens (kernel 1 or 3)."""

    def __init__(self, dim: int, nominal_hidden: int, kernel_size: int) -> None:
        super().__init__()
        hidden = conv_mlp_hidden(nominal_hidden)
        pad = kernel_size // 2
        self.w1 = TokenConv1d(dim, hidden, kernel_size, padding=pad, bias=False)
        self.w2 = TokenConv1d(hidden, dim, kernel_size, padding=pad, bias=False)
        self.w3 = TokenConv1d(dim, hidden, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TimestepEmbedder(nn.Module):
    """Sinusoid of t (fp32) -> Linear -> SiLU -> Linear, keys ``mlp.0`` / ``mlp.2``."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_sinusoid(t, self.freq_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """cos-first sinusoid of (fractional) timesteps on the 0..1000 scale, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ConditionProjection(nn.Module):
    """Text (CLAP) features -> model width: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed1D(nn.Module):
    """Latent channels -> tokens: Conv1d(k=patch) then channel-last (key ``proj``)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv1d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).transpose(1, 2)


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) -> Linear.

    ``adaLN_modulation`` exists only so the official checkpoint loads: in the official model the
    conditioning reaching this layer is per-token (3-D) and its ``modulate`` helper silently drops
    3-D shift/scale, so the modulation never takes effect. We reproduce that by not computing it.
    """

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6))


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (1-D, adjacent pairs rotated, theta 10000)
# ---------------------------------------------------------------------------------------------


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[len(positions), head_dim]`` for float32 positions, pair-repeated.

    Every entry is computed elementwise from its own position, so a row does not depend on which
    other positions are in the table: a gathered table equals the official full-length table's row.
    """
    exps = torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim
    freqs = 1.0 / (theta**exps)
    angles = torch.outer(positions.float(), freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [..., L, D]`` (tables ``[L, D]`` broadcast), in fp32."""
    xf = x.float()
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


def nearest_exact_index(src_len: int, dst_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Source index chosen by ``F.interpolate(mode="nearest-exact")`` for each of ``dst_len`` outputs.

    Asked of PyTorch itself rather than re-derived, because its float32 formula differs from exact
    rational arithmetic for some length pairs, and the official model depends on PyTorch's choice.
    """
    src = torch.arange(src_len, dtype=torch.float32, device=device).view(1, 1, src_len)
    return F.interpolate(src, size=dst_len, mode="nearest-exact").view(dst_len).long()
