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
    """SiLU -> Linear(d, factor*d): the adaLN shift/scale/gate producer (key ``<name>.linear``).

    Returns ``[..., factor, d]``: chunks in (shift, scale, gate) triples, every scale already turned
    into ``1 + scale``. The add is one in-place op on a strided view, in the linear's output dtype,
    which is where the official ``1 + scale`` is rounded too (in bf16 under autocast). ``index``
    gathers token rows after the add (the single blocks' modulation runs on distinct sync rows).
    """

    def __init__(self, hidden_size: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden_size, factor * hidden_size, bias=True)

    def forward(self, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        mod = self.linear(F.silu(c)).unflatten(-1, (self.factor, -1))
        mod[..., 1::3, :].add_(1)  # not "+= 1": that adds a copy back
        return mod if index is None else mod[:, index]


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
    """A Conv1d over the token axis of a token-major ``[B, L, C]`` tensor.

    This is the checkpoint's form; :func:`fuse_for_inference` swaps it for a :class:`TapLinear`,
    which needs no transposed copy of its input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def tap_weight(conv: nn.Conv1d) -> torch.Tensor:
    """``[Cout, Cin, k]`` -> ``[k*Cout, Cin]``, tap-major: row block ``j`` multiplies ``x[t + j - k//2]``."""
    return conv.weight.detach().permute(2, 0, 1).reshape(-1, conv.in_channels)


def shifted_tap_sum(p: torch.Tensor, kernel_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = sum_j P_j[t + j - k//2]`` (zero outside) for tap products ``p [B, L, k*C]``.

    The sum is taken in float32 and rounded once to ``p.dtype``, as a convolution accumulates; the
    shift happens after the per-token product, so per-token activation scales (FP8) stay exact.
    """
    b, n, _ = p.shape
    taps = p.view(b, n, kernel_size, -1)
    half = kernel_size // 2
    y = taps[:, :, half].float()
    for j in range(kernel_size):
        off = j - half
        # .add_ on the slice, not "y[s] += ...", which Python turns into an add plus a copy back.
        if off < 0:
            y[:, -off:].add_(taps[:, : n + off, j])
        elif off > 0:
            y[:, : n - off].add_(taps[:, off:, j])
    if bias is not None:
        y.add_(bias)
    return y.to(p.dtype)


class TapLinear(nn.Module):
    """A stride-1 'same' token convolution as ONE GEMM with ``N = k*Cout`` plus a shifted add.

    Replaces :class:`TokenConv1d` for inference (exact in exact arithmetic). Several convolutions
    of the same input can share it by stacking their weights per tap (``SwiGLU``'s w1 and w3).

    ``conv_layout``: keep the weight as ``[Cout, Cin, k]`` and run ``conv1d`` instead. On CPUs the
    oneDNN convolution beats the tap GEMM (measured 1.05-1.34x on XL's shapes), so a CPU engine
    uses it; GPUs take the GEMM, which is what FP8 and Inductor want.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: int, conv_layout: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_layout = conv_layout
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_convs(cls, *convs: nn.Conv1d, conv_layout: bool = False) -> "TapLinear":
        """One tap GEMM for convs of the same input; output channels concatenated in ``convs`` order."""
        k = convs[0].kernel_size[0]
        for conv in convs:
            if conv.stride != (1,) or conv.dilation != (1,) or conv.groups != 1 or conv.padding != (k // 2,) or k % 2 == 0:
                raise ValueError(f"only stride-1, odd-kernel 'same' convs become tap GEMMs; got {conv}")
            if conv.kernel_size[0] != k or conv.in_channels != convs[0].in_channels:
                raise ValueError("convs sharing one tap GEMM need the same kernel size and input channels")
        biases = [conv.bias for conv in convs]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(c.out_channels, dtype=c.weight.dtype, device=c.weight.device)
             for b, c in zip(biases, convs)]
        )
        if conv_layout:
            return cls(torch.cat([conv.weight.detach() for conv in convs], dim=0).contiguous(), bias, k, conv_layout=True)
        # [k, sum(Cout), Cin]: for each tap, every conv's rows.
        w = torch.cat([conv.weight.detach().permute(2, 0, 1) for conv in convs], dim=1)
        return cls(w.reshape(-1, convs[0].in_channels).contiguous(), bias, k)

    def tap_major_weight(self) -> torch.Tensor:
        """The weight as ``[k*Cout, Cin]`` whatever the layout (what the FP8 GEMM quantises)."""
        w = self.weight.detach()
        return w.permute(2, 0, 1).reshape(-1, w.shape[1]) if self.conv_layout else w

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.conv_layout else self.weight.shape[0] // self.kernel_size

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, taps={self.kernel_size}" + (", conv layout" if self.conv_layout else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_layout:
            return F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=self.kernel_size // 2).transpose(1, 2)
        if self.kernel_size == 1:
            return F.linear(x, self.weight, self.bias)
        return shifted_tap_sum(F.linear(x, self.weight), self.kernel_size, self.bias)


def conv_mlp_hidden(hidden: int, multiple_of: int = 256) -> int:
    """The official ConvMLP shrinks its nominal hidden size to 2/3 and rounds up to ``multiple_of``."""
    h = int(2 * hidden / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class ConvMLP(nn.Module):
    """SwiGLU whose three projections are bias-free Conv1d over tokens (kernel 1 or 3).

    After :meth:`fuse` (inference), w1 and w3 run as one tap GEMM ``w13`` on the shared input.
    """

    def __init__(self, dim: int, nominal_hidden: int, kernel_size: int) -> None:
        super().__init__()
        hidden = conv_mlp_hidden(nominal_hidden)
        pad = kernel_size // 2
        self.w1 = TokenConv1d(dim, hidden, kernel_size, padding=pad, bias=False)
        self.w2 = TokenConv1d(hidden, dim, kernel_size, padding=pad, bias=False)
        self.w3 = TokenConv1d(dim, hidden, kernel_size, padding=pad, bias=False)

    def fuse(self, conv_layout: bool = False) -> None:
        """Replace w1/w3 by one tap GEMM ``w13`` and w2 by a :class:`TapLinear` (frees the originals)."""
        if hasattr(self, "w13"):
            return
        self.w13 = TapLinear.from_convs(self.w1, self.w3, conv_layout=conv_layout)
        self.w2 = TapLinear.from_convs(self.w2, conv_layout=conv_layout)
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "w13"):
            h1, h3 = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(h1) * h3)
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
    # Built on t's device: a host table would be a host-to-device copy on every step.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
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


def rope_operands(positions: torch.Tensor, head_dim: int, device: torch.device | str, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables :func:`rope_fp32` takes: ``cos`` and the sign-folded ``sin`` (``-sin`` on even
    channels), shaped ``[L, 1, Dh]`` to broadcast over token-major ``[B, L, H, Dh]``."""
    cos, sin = rope_tables(positions, head_dim, theta)
    sin = sin.clone()
    sin[:, 0::2].neg_()
    return cos[:, None].to(device), sin[:, None].to(device)


def rope_fp32(xf: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate adjacent channel pairs of float32 ``xf``: ``(x0, x1) -> (x0 c - x1 s, x1 c + x0 s)``,
    written in ``out_dtype`` (rounded once, by the last op itself rather than a separate cast)."""
    swapped = torch.stack((xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return _addcmul_as(xf * cos, swapped, sin_signed, out_dtype or xf.dtype)


def _addcmul_as(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a + b * c`` computed in float32 and written in ``dtype``: one kernel instead of two.

    The output is always a fresh contiguous tensor: left to itself an elementwise op may pick a
    permuted layout from strided inputs, and attention kernels need the head dim innermost.
    """
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or c.requires_grad):
        # Training (the distilled student, foleyserve.distill): out= is not differentiable.
        return torch.addcmul(a, b, c).to(dtype).contiguous()
    shape = torch.broadcast_shapes(a.shape, b.shape, c.shape)
    return torch.addcmul(a, b, c, out=torch.empty(shape, dtype=dtype, device=a.device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [..., L, D]`` (plain tables ``[L, D]`` broadcast), in fp32."""
    xf = x.float()
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """QK-norm and RoPE fused: RMS-normalise over the head dim in fp32, apply the gain, rotate,
    and round to ``x.dtype`` once (the official code rounds after the norm and again after RoPE;
    in fp32 the two are the same arithmetic). ``rope`` comes from :func:`rope_operands`.
    ``weight`` is ``[Dh]``, or ``[P, 1, Dh]`` to normalise P stacked parts (q and k) in one pass
    when ``x`` is ``[B, L, P, H, Dh]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    cos, sin = rope
    if x.dim() == 5:  # [B, L, P, H, Dh]: the tables [L, 1, Dh] gain the part axis
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return rope_fp32(xf, cos, sin, x.dtype)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in float32 on every device (``scale1`` is ``1 + scale``),
    written in ``out_dtype`` (the consuming GEMM's input dtype), rounded once.

    Explicit because autocast disagrees between devices: CUDA autocast runs layer_norm in fp32
    (and the modulate then promotes to fp32, the official GPU numerics) while CPU autocast keeps a
    bf16 input in bf16.
    """
    return _addcmul_as(shift, F.layer_norm(x.float(), (x.shape[-1],), eps=eps), scale1, out_dtype)


def nearest_exact_index(src_len: int, dst_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Source index chosen by ``F.interpolate(mode="nearest-exact")`` for each of ``dst_len`` outputs.

    Asked of PyTorch itself rather than re-derived, because its float32 formula differs from exact
    rational arithmetic for some length pairs, and the official model depends on PyTorch's choice.
    """
    src = torch.arange(src_len, dtype=torch.float32, device=device).view(1, 1, src_len)
    return F.interpolate(src, size=dst_len, mode="nearest-exact").view(dst_len).long()
