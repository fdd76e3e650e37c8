"""The two visual preprocessors: SigLIP2 (512x512 squash, PIL bilinear) and Synchformer (224 crop).

SigLIP2 follows **Pillow <= 12** exactly. The official transform is torchvision v1
``Resize((512, 512))`` on a PIL image, i.e. ``Image.resize((512, 512), BILINEAR)`` with no
``reducing_gap`` (torchvision passes none, and Pillow's default is None, so ``reduce()`` never runs).
Pillow up to 12 does that as two separable fixed-point passes, horizontal first then vertical, each
rounded and clamped to uint8, skipping a pass whose axis keeps its size. Pillow 13 runs the vertical
pass first on some portrait frames, which changes about a fifth of the values by one step. The
official environment resolves Pillow < 11 (Gradio 3.50 pins it), so <= 12 is what the model was used
with. We do not call Pillow at all: ``pil_bilinear_resize`` recomputes Pillow's coefficients (float64,
the same expressions in the same order, 22-bit fixed point) and applies them with banded float32
matrix products whose integer operands keep every sum exact, so the result does not depend on the
installed Pillow (tests/test_siglip_resize.py holds stored Pillow 12.3 outputs).

Synchformer is torchvision v2 ``Resize(224, BICUBIC, antialias)`` on uint8 CPU tensors, which since
torchvision 0.16 calls torch's native uint8 kernel; we call the same kernel, so it is faithful as is.
``ToDtype(float32, scale=True)`` multiplies by float32(1/255) (not a division: they differ by one ulp
on about half of the values), then ``Normalize(0.5, 0.5)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

SIGLIP_SIZE = 512
SYNC_SIZE = 224

_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images (32 - 8 - 2)
# Weights are split into high and low parts of (22 - _LOW_BITS) and _LOW_BITS bits, so that every
# product and partial sum of a float32 matrix product stays an integer below 2**24 (hence exact).
_LOW_BITS = 7
_BLOCK = 16  # outputs per banded block: a narrow band wastes fewer multiplications on zeros


class _Pass(NamedTuple):
    """One axis's banded weights: block b maps inputs ``starts[b]:stops[b]`` to outputs ``b*B:(b+1)*B``."""

    out_size: int
    block: int
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    right: tuple[np.ndarray, ...]  # float32 [L_b, 2B]: high parts, then low parts (x @ w)
    left: tuple[np.ndarray, ...]  # the same transposed, [2B, L_b] (w @ x)


@functools.lru_cache(maxsize=32)
def _pass_weights(in_size: int, out_size: int) -> _Pass:
    """Pillow's bilinear coefficients for one axis (``precompute_coeffs`` then
    ``normalize_coeffs_8bpc``), cut into banded blocks; the last block is padded with zero outputs."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter has support 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C's (int) cast truncates toward zero; negative starts are clamped to 0 right after anyway.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    w = np.zeros((out_size, ksize), np.float64)
    total = np.zeros(out_size, np.float64)
    for t in range(ksize):  # tap by tap so the normalising sum adds in Pillow's order
        v = np.maximum(1.0 - np.abs(((t + xmin).astype(np.float64) - center + 0.5) * ss), 0.0)
        v = np.where(t < xmax, v, 0.0)
        w[:, t] = v
        total += v
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    k = np.trunc(0.5 + w * (1 << _PRECISION_BITS)).astype(np.int64)  # weights are >= 0 here
    if int(xmax.max()) * 255 * ((1 << _LOW_BITS) - 1) >= 1 << 24:
        raise ValueError(f"cannot resize {in_size} -> {out_size} pixels exactly in float32: the factor is too large")
    block = min(_BLOCK, out_size)
    starts, stops, right, left = [], [], [], []
    for first in range(0, out_size, block):
        outs = range(first, min(first + block, out_size))
        lo = int(xmin[outs.start : outs.stop].min())
        hi = int((xmin[outs.start : outs.stop] + xmax[outs.start : outs.stop]).max())
        dense = np.zeros((hi - lo, block), np.int64)
        for j, o in enumerate(outs):
            dense[xmin[o] - lo : xmin[o] - lo + xmax[o], j] = k[o, : xmax[o]]
        split = np.concatenate([dense >> _LOW_BITS, dense & ((1 << _LOW_BITS) - 1)], axis=1).astype(np.float32)
        starts.append(lo)
        stops.append(hi)
        right.append(split)
        left.append(np.ascontiguousarray(split.T))
    return _Pass(out_size, block, tuple(starts), tuple(stops), tuple(right), tuple(left))


def _round_clip8(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Exact integer sums from their float32 high and low parts -> Pillow's rounded, clipped uint8."""
    acc = high.astype(np.int32)
    acc <<= _LOW_BITS
    acc += low.astype(np.int32)
    # Pillow starts each sum at half a unit and shifts right: round half up; then clip8.
    acc += 1 << (_PRECISION_BITS - 1)
    acc >>= _PRECISION_BITS
    return np.clip(acc, 0, 255).astype(np.uint8)


def _horizontal(x: np.ndarray, p: _Pass) -> np.ndarray:
    """float32 [R, W] -> uint8 [R, w]: the pass along the contiguous axis, as x @ weights."""
    buf = np.empty((len(p.right), x.shape[0], 2 * p.block), np.float32)
    for b, (lo, hi, w) in enumerate(zip(p.starts, p.stops, p.right)):
        np.matmul(x[:, lo:hi], w, out=buf[b])
    out = _round_clip8(buf[..., : p.block], buf[..., p.block :])  # [nb, R, B]
    return out.transpose(1, 0, 2).reshape(x.shape[0], -1)[:, : p.out_size]


def _vertical(x: np.ndarray, p: _Pass) -> np.ndarray:
    """float32 [C, H, w] -> uint8 [C, h, w]: the pass along the middle axis, as weights @ x."""
    buf = np.empty((len(p.left), x.shape[0], 2 * p.block, x.shape[2]), np.float32)
    for b, (lo, hi, w) in enumerate(zip(p.starts, p.stops, p.left)):
        np.matmul(w, x[:, lo:hi], out=buf[b])
    out = _round_clip8(buf[:, :, : p.block], buf[:, :, p.block :])  # [nb, C, B, w]
    return out.transpose(1, 0, 2, 3).reshape(x.shape[0], -1, x.shape[2])[:, : p.out_size]


def _resize_frame(frame: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    h_in, w_in = frame.shape[:2]
    # Planar [3, H, W]: both passes then read contiguous rows (the uint8 transpose is the cheap one).
    y = np.ascontiguousarray(frame.transpose(2, 0, 1))
    if w_out != w_in:
        y = _horizontal(y.reshape(3 * h_in, w_in).astype(np.float32), _pass_weights(w_in, w_out)).reshape(3, h_in, w_out)
    if h_out != h_in:
        y = _vertical(y.astype(np.float32), _pass_weights(h_in, h_out))
    return np.ascontiguousarray(y.transpose(1, 2, 0))


def pil_bilinear_resize(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 [..., H, W, 3] -> uint8 [..., h, w, 3] (``size`` = (h, w)), value for value what
    Pillow <= 12 ``Image.fromarray(f).resize((w, h), Image.BILINEAR)`` returns for each frame.

    Horizontal pass first, then vertical, each rounded and clamped to uint8; a pass is skipped when its
    axis keeps its size (Pillow's ``need_horizontal`` / ``need_vertical``). Runs on the CPU, a frame at
    a time (a frame's float32 copy is the largest temporary).
    """
    x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if x.dtype != np.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [..., H, W, 3], got {x.dtype} {tuple(x.shape)}")
    h_out, w_out = size
    flat = x.reshape(-1, *x.shape[-3:])
    out = np.empty((len(flat), h_out, w_out, 3), np.uint8)
    with _one_blas_thread():
        for i, frame in enumerate(flat):
            out[i] = frame if frame.shape[:2] == (h_out, w_out) else _resize_frame(frame, h_out, w_out)
    return out.reshape(*x.shape[:-3], h_out, w_out, 3)


_BLAS: Any = None


def _one_blas_thread() -> Any:
    """numpy's BLAS on one thread for the resize's small matmuls. With its default thread count,
    OpenBLAS spins its threads against the denoiser's (the server runs decoding beside it):
    measured 165 ms per 1080p frame on this 2-core box under load, 38 ms on one thread."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def siglip_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, 512, 512, 3]: the SigLIP2 resize, before scaling to [-1, 1]."""
    return pil_bilinear_resize(frames, (SIGLIP_SIZE, SIGLIP_SIZE))


def synchformer_size(height: int, width: int, size: int = SYNC_SIZE) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of Resize(size) + CenterCrop(size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def _as_nchw_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        if not frames.flags.writeable:
            frames = frames.copy()  # torch.from_numpy would warn about read-only memory
        frames = torch.from_numpy(frames)
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 RGB [T, H, W, 3], got dtype {frames.dtype}")
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got shape {tuple(frames.shape)}")
    # A channels-last view, exactly what the official gets from torch.from_numpy(f).permute(0, 3, 1, 2);
    # the uint8 kernels are fastest on this layout.
    return frames.permute(0, 3, 1, 2)


def _resize_bicubic_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    # No uint8 interpolate kernels off the CPU: torchvision's own fallback.
    y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return y.clamp_(0, 255).round_().to(torch.uint8)


def _synchformer_uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    new_h, new_w, top, left = synchformer_size(h, w)
    if (new_h, new_w) != (h, w):
        x = _resize_bicubic_uint8(x, (new_h, new_w))
    return x[..., top : top + SYNC_SIZE, left : left + SYNC_SIZE]


def synchformer_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, 224, 224, 3]: Resize(224) + CenterCrop(224), before scaling."""
    return _synchformer_uint8_nchw(_as_nchw_uint8(frames).cpu()).permute(0, 2, 3, 1).contiguous().numpy()


def siglip_pixels(frames: np.ndarray | torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, 512, 512] in [-1, 1] (squashed, aspect ratio not kept).

    Frames already 512x512 (what ``decode_frames`` stores) are only scaled, as PIL copies them."""
    x = _as_nchw_uint8(frames)
    out = torch.empty((x.shape[0], 3, SIGLIP_SIZE, SIGLIP_SIZE), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        part = x[s : s + chunk]
        if tuple(part.shape[-2:]) != (SIGLIP_SIZE, SIGLIP_SIZE):
            resized = pil_bilinear_resize(part.permute(0, 2, 3, 1), (SIGLIP_SIZE, SIGLIP_SIZE))
            part = torch.from_numpy(resized).permute(0, 3, 1, 2).to(x.device)
        o = out[s : s + chunk]
        o.copy_(part)
        o.div_(255).sub_(0.5).div_(0.5)  # ToTensor divides, then Normalize(0.5, 0.5)
    return out


def synchformer_pixels(frames: np.ndarray | torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224] in [-1, 1] (short side to 224, center crop).

    Frames already 224x224 (what ``decode_frames`` stores) pass through unresampled, as in torchvision."""
    x = _as_nchw_uint8(frames)
    out = torch.empty((x.shape[0], 3, SYNC_SIZE, SYNC_SIZE), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        o = out[s : s + chunk]
        o.copy_(_synchformer_uint8_nchw(x[s : s + chunk]))
        o.mul_(1.0 / 255).sub_(0.5).div_(0.5)  # ToDtype(float32, scale=True), Normalize(0.5, 0.5)
    return out
