"""Precision policies for the denoiser: which layers run in which precision, and how.

``apply_policy(dit, precision)`` converts a loaded :class:`~foleyserve.models.dit.FoleyDiT` in place.
Every policy first puts the model in its inference layout (``fuse_for_inference``: the k=3 token
convolutions become tap GEMMs, a ConvMLP's w1 and w3 share one), so all policies run the same
layout and differ only in arithmetic:

- ``fp32``: everything float32 (the reference path).
- ``bf16`` / ``fp16``: weights in the low dtype and the model run under autocast, as the official
  code runs bf16 — except the layers matched by ``keep_fp32``, whose weights stay float32 and whose
  forward runs with autocast off on float32 inputs.
- ``fp8``: the matmul-heavy layers of the blocks (attention projections, MLPs and the tap GEMMs of
  the single blocks) hold float8 e4m3 weights with one scale per output row, and quantise their
  input per token at run time (one fused Triton kernel on CUDA). On GPUs with FP8 tensor cores
  (compute capability 8.9+) the product runs in ``torch._scaled_mm``; elsewhere a fallback computes
  the same quantised product in float32. Everything else runs as the bf16 policy.
- ``fp8-weight-only``: the same float8 weights (about half the bf16 weight memory), dequantised
  into one reused bf16 buffer just before each GEMM; activations are not quantised. Works on any
  device; saves memory, not time.

Numerics that are already computed in float32 by the model whatever the policy (RMS/QK norms,
RoPE, the sinusoidal timestep features, the sampler's Euler update and CFG) are untouched.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from foleyserve.kernels.fp8_quant import E4M3_MAX, dequantize_rows, quantize_per_token, quantize_per_token_torch
from foleyserve.models.layers import TapLinear, TokenConv1d, shifted_tap_sum

POLICIES = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Layers kept in float32 under the low-precision policies (module-name patterns; a pattern also
# covers the module's children). The time embedding feeds every modulation of every block and the
# final projection writes the velocity itself; both are tiny, so float32 costs nothing measurable.
DEFAULT_KEEP_FP32: tuple[str, ...] = ("time_in", "final_layer")

# Layers given float8 weights under the fp8 policies: the blocks' linear and tap (conv) projections,
# and the triple blocks' modulation producers (2.2 GB of XXL's bf16 weights, run on one time
# vector per row: float8 there cost nothing measurable on the fixture, rel_l2 3.42e-2 vs 3.34e-2,
# and brings XXL to 0.555x the bf16 bytes instead of 0.629x; bench/results/fp8_exclude_cpu.md).
# The single blocks' per-token modulation stays bf16: it sets every shift/scale/gate per token.
DEFAULT_FP8_LAYERS: tuple[str, ...] = ("triple_blocks.*", "single_blocks.*")
DEFAULT_FP8_EXCLUDE: tuple[str, ...] = ("*.modulation.linear",)

__all__ = [
    "DEFAULT_FP8_EXCLUDE", "DEFAULT_FP8_LAYERS", "DEFAULT_KEEP_FP32", "E4M3_MAX", "POLICIES",
    "DequantScratch", "Fp8Linear", "Fp8TapLinear", "PolicyReport", "apply_policy", "fp8_supported",
    "keep_in_fp32", "module_bytes", "quantize_rows", "weight_bytes_report",
]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


# Device index -> FP8 tensor cores? Asked once per device: layers consult it on every call, and a
# cached dict lookup is cheaper in eager mode and constant under torch.compile.
_FP8_SUPPORT: dict[int, bool] = {}


def fp8_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` runs e4m3 GEMMs on tensor cores (Ada, Hopper and later)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    known = _FP8_SUPPORT.get(index)
    if known is None:
        known = _FP8_SUPPORT[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return known


# ---------------------------------------------------------------------------------------------
# Float8 layers
# ---------------------------------------------------------------------------------------------


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales with one scale per row (``w ≈ q * scale[:, None]``).

    The same arithmetic as the activations' per-token quantisation (:mod:`foleyserve.kernels`).
    """
    q, scale = quantize_per_token_torch(w)
    return q, scale.squeeze(-1)


class DequantScratch:
    """Reusable buffers into which fp8-weight-only layers dequantise their weights.

    One buffer per (thread, device, dtype), sized once to the largest layer of the policy that
    made it (``numel``), so dequantising allocates nothing and every layer writes the same memory.

    Why reuse is safe: a layer dequantises into the buffer and hands it straight to its GEMM; the
    next layer's dequantisation is issued later by the same thread, so on a CPU the GEMM has
    returned, and on CUDA it is queued on the same stream behind the GEMM that reads the buffer.
    Threads get buffers of their own, because the batcher's threads may run layers of one model
    at the same time. (Unsafe only if one thread runs layers on several CUDA streams at once.)

    CUDA graphs: the buffer is allocated once, so a warm-up call before capture allocates it and
    every replay reuses its address. ``torch.compile`` never sees it: compiled code dequantises
    functionally, and Inductor fuses that into one kernel and plans its memory itself.
    """

    def __init__(self, numel: int = 0) -> None:
        self.numel = numel
        self._local = threading.local()

    def get(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` view of this thread's buffer for ``(device, dtype)`` (allocated on first use)."""
        n = math.prod(shape)
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get((device, dtype))
        if buf is None or buf.numel() < n:
            buf = bufs[(device, dtype)] = torch.empty(max(n, self.numel), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def release(self) -> None:
        """Drop every thread's buffers (they are re-made on the next call)."""
        self._local = threading.local()

    def __reduce__(self):  # deepcopy / pickle: a fresh, empty pool (thread-locals do not copy)
        return (DequantScratch, (self.numel,))


# For layers built outside apply_policy (tests, benches). apply_policy gives each model its own.
_DEFAULT_SCRATCH = DequantScratch()


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with e4m3 weights (per-output-channel scales).

    ``quantize_input`` True (w8a8): the input is quantised per token as well (one fused kernel on
    CUDA) and the product runs in ``torch._scaled_mm`` on FP8 tensor cores when the device has them,
    the output is bf16 and the shapes suit the kernel; otherwise the same quantised product is
    computed in float32. False (w8): the weight is dequantised into a shared, reused buffer
    (:class:`DequantScratch`) and multiplied in the input's low dtype.

    ``use_fast_accum`` is passed to ``_scaled_mm`` (Hopper's faster, less exact fp8 accumulation).
    Off by default; whether it is worth its error is measured by ``bench/device_check.py``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantize_input: bool,
        out_dtype: torch.dtype,
        *,
        use_fast_accum: bool = False,
        scratch: DequantScratch | None = None,
    ) -> None:
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        self.quantize_input = quantize_input
        self.out_dtype = out_dtype
        self.use_fast_accum = use_fast_accum
        self.scratch = _DEFAULT_SCRATCH if scratch is None else scratch
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # The CUTLASS row-wise fp8 kernels want K and N multiples of 16 (every XXL/XL layer is).
        self._mm_shapes_ok = weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0

    def extra_repr(self) -> str:
        mode = "w8a8" if self.quantize_input else "w8"
        return f"in={self.in_features}, out={self.out_features}, {mode}, out_dtype={self.out_dtype}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor ``(q * scale).to(dtype)``: the reference for every dequantising path."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _dequantized_in_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.dequantized_weight(dtype)
        out = self.scratch.get(self.weight.shape, dtype, self.weight.device)
        return dequantize_rows(self.weight, self.weight_scale, out)

    def _on_tensor_cores(self, device: torch.device) -> bool:
        # Row-wise scaled fp8 GEMMs produce bf16 only.
        return self.out_dtype == torch.bfloat16 and self._mm_shapes_ok and fp8_supported(device)

    def product(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2 [M, K] @ W^T (+ bias)`` -> ``[M, rows of W]``, in ``out_dtype`` (w8a8) or the low dtype (w8)."""
        if not self.quantize_input:
            dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else self.out_dtype
            w = self._dequantized_in_scratch(dtype)
            return F.linear(x2.to(dtype), w, None if bias is None else bias.to(dtype))
        xq, x_scale = quantize_per_token(x2)  # x_scale [M, 1]: scale_a's row-wise layout
        if self._on_tensor_cores(x2.device):
            return torch._scaled_mm(
                xq,
                self.weight.t(),  # column-major [K, N], as the kernel wants
                scale_a=x_scale,
                scale_b=self.weight_scale[None, :],
                bias=bias,
                out_dtype=self.out_dtype,
                use_fast_accum=self.use_fast_accum,
            )
        # The same quantised operands, multiplied in float32 (autocast off, or it would round them
        # to bf16): what the tensor cores compute, up to their accumulation order.
        with torch.autocast(device_type=x2.device.type, enabled=False):
            y = (xq.float() * x_scale) @ (self.weight.float() * self.weight_scale[:, None]).t()
            if bias is not None:
                y = y + bias.float()
        return y.to(self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.product(x.reshape(-1, shape[-1]), self.bias).reshape(*shape[:-1], -1)


class Fp8TapLinear(Fp8Linear):
    """A :class:`~foleyserve.models.layers.TapLinear` (k-tap token convolution) with e4m3 weights.

    One GEMM with ``N = k*Cout`` on the input quantised once per token: every tap (and, for a
    ConvMLP's fused ``w13``, both w1 and w3) shares that quantisation. Then the shifted tap sum
    ``y[t] = sum_j P_j[t + j - k//2]`` and the bias. Exact as a convolution of the quantised
    operands: each token's activation scale multiplies that token's own products, and the shift
    happens after the scaling. The tap-major weight gets one scale per row, i.e. per (tap, output
    channel).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernel_size: int,
        quantize_input: bool,
        out_dtype: torch.dtype,
        *,
        use_fast_accum: bool = False,
        scratch: DequantScratch | None = None,
    ) -> None:
        if weight.shape[0] % kernel_size:
            raise ValueError(f"a tap-major weight has k*Cout rows; {weight.shape[0]} is not a multiple of {kernel_size}")
        # The GEMM itself has no bias: it is added once, after the shifted sum.
        super().__init__(weight, None, quantize_input, out_dtype, use_fast_accum=use_fast_accum, scratch=scratch)
        self.kernel_size = kernel_size
        self.out_features = weight.shape[0] // kernel_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)

    @classmethod
    def from_tap(cls, tap: TapLinear, quantize_input: bool, out_dtype: torch.dtype, **kwargs) -> "Fp8TapLinear":
        """The float8 form of ``tap`` (same layout, same kernel size)."""
        return cls(tap.tap_major_weight(), tap.bias, tap.kernel_size, quantize_input, out_dtype, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", taps={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1:
            return super().forward(x)
        b, n, c = x.shape
        p = self.product(x.reshape(b * n, c), None)
        return shifted_tap_sum(p.view(b, n, -1), self.kernel_size, self.bias)


# ---------------------------------------------------------------------------------------------
# Keeping layers in float32 under autocast
# ---------------------------------------------------------------------------------------------


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def keep_in_fp32(module: nn.Module) -> None:
    """Run ``module`` in float32: float32 weights, float32 inputs, autocast off inside.

    The forward is wrapped on the instance, so parameter names (and checkpoint keys) are unchanged.
    """
    module.float()
    if getattr(module, "_foleyserve_fp32", False):
        return
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        args = tuple(_cast_floats(a, torch.float32) for a in args)
        kwargs = {k: _cast_floats(v, torch.float32) for k, v in kwargs.items()}
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return inner(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module._foleyserve_fp32 = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------


@dataclass
class PolicyReport:
    """What :func:`apply_policy` did: dtypes, layer placement, and resident weight bytes."""

    precision: str
    autocast_dtype: torch.dtype | None
    fused: bool = False
    kept_fp32: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    fp8_bytes: int = 0  # of bytes_after: the float8 layers (e4m3 weights, fp32 row scales, biases)

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None,
            "fused": self.fused,
            "kept_fp32": self.kept_fp32,
            "fp8_layers": len(self.fp8),
            "fp8": self.fp8,
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
            "fp8_weight_bytes": self.fp8_bytes,
        }


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (works on the meta device too)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _to_fp8(module: nn.Module, quantize_input: bool, low: torch.dtype, **kwargs: Any) -> Fp8Linear | None:
    """The float8 replacement of ``module``, or None for a module that stays as it is."""
    if isinstance(module, TokenConv1d):  # a model without fuse_for_inference: make the tap GEMM here
        module = TapLinear.from_convs(module)
    if isinstance(module, TapLinear):
        return Fp8TapLinear.from_tap(module, quantize_input, low, **kwargs)
    if isinstance(module, nn.Linear):
        return Fp8Linear(module.weight.detach(), module.bias, quantize_input, low, **kwargs)
    return None


def apply_policy(
    dit: nn.Module,
    precision: str,
    *,
    keep_fp32: Iterable[str] | None = None,
    fp8_layers: Iterable[str] | None = None,
    fp8_exclude: Iterable[str] | None = None,
    use_fast_accum: bool = False,
) -> PolicyReport:
    """Convert ``dit`` in place to ``precision`` (one of :data:`POLICIES`) and say what went where.

    Every policy, fp32 included, first calls ``dit.fuse_for_inference()`` when the model has it
    (idempotent), so load checkpoints before this. ``keep_fp32``: module-name patterns kept in
    float32 (default :data:`DEFAULT_KEEP_FP32`; pass ``[]`` for the official all-bf16 numerics).
    ``fp8_layers``/``fp8_exclude``: which ``nn.Linear``, ``TapLinear`` and ``TokenConv1d`` layers get
    float8 weights under the fp8 policies. ``use_fast_accum``: see :class:`Fp8Linear`.
    """
    if precision not in POLICIES:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(POLICIES)}")
    fuse = getattr(dit, "fuse_for_inference", None)
    if callable(fuse):
        fuse()
    report = PolicyReport(precision=precision, autocast_dtype=None, fused=callable(fuse), bytes_before=module_bytes(dit))
    if precision == "fp32":
        dit.float()
        dit.autocast_dtype = None  # type: ignore[attr-defined]
        report.bytes_after = module_bytes(dit)
        return report

    low = LOW_DTYPES.get(precision, torch.bfloat16)
    keep = list(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
    dit.to(low)
    if precision.startswith("fp8"):
        include = list(DEFAULT_FP8_LAYERS if fp8_layers is None else fp8_layers)
        exclude = list(DEFAULT_FP8_EXCLUDE if fp8_exclude is None else fp8_exclude)
        quantize_input = precision == "fp8"
        if torch.cuda.is_available():  # fill fp8_supported's cache now, so compiled code only reads it
            for index in range(torch.cuda.device_count()):
                fp8_supported(torch.device("cuda", index))
        # One dequantisation buffer per model, shared by all its weight-only layers.
        scratch = DequantScratch()
        for name, module in list(dit.named_modules()):
            if not name or not _matches(name, include) or _matches(name, exclude) or _matches(name, keep):
                continue
            new = _to_fp8(module, quantize_input, low, use_fast_accum=use_fast_accum, scratch=scratch)
            if new is None:
                continue
            _replace(dit, name, new)
            report.fp8.append(name)
            report.fp8_bytes += module_bytes(new)
            scratch.numel = max(scratch.numel, new.weight.numel())
    for name, module in dit.named_modules():
        if name and _matches(name, keep) and not _matches(name.rpartition(".")[0], keep):
            keep_in_fp32(module)
            report.kept_fp32.append(name)
    # The learned empty features are concatenated with the (float32) real features, as the official
    # loop does; keep them in the features' dtype so torch.cat does not round the real ones.
    for pname in ("empty_clip_feat", "empty_sync_feat"):
        p = getattr(dit, pname, None)
        if isinstance(p, nn.Parameter):
            p.data = p.data.float()
    dit.autocast_dtype = low  # type: ignore[attr-defined]
    report.autocast_dtype = low
    report.bytes_after = module_bytes(dit)
    return report


def weight_bytes_report(
    model_kwargs: Mapping[str, Any] | None = None,
    policies: Iterable[str] = ("bf16", "fp8", "fp8-weight-only"),
    **policy_kwargs: Any,
) -> dict[str, Any]:
    """Resident DiT weight bytes per policy, without allocating: each policy is applied to a fresh
    model on the meta device (default: XXL) and its parameters and buffers are counted, so float8
    layers count 1 byte per weight plus 4 per output-row scale, and kept layers 4 per weight.

    Returns ``{"bytes": {policy: n}, "fp8_layer_bytes": {policy: n}, "ratio_to_bf16": {policy: r}}``
    (the ratio only when ``bf16`` is among ``policies``).
    """
    from foleyserve.models.dit import build_dit, xxl_config

    kwargs = xxl_config() if model_kwargs is None else model_kwargs
    sizes: dict[str, int] = {}
    fp8_sizes: dict[str, int] = {}
    for policy in policies:
        dit = build_dit(kwargs, dtype=torch.bfloat16, device="meta")
        report = apply_policy(dit, policy, **policy_kwargs)
        sizes[policy], fp8_sizes[policy] = report.bytes_after, report.fp8_bytes
    out: dict[str, Any] = {"bytes": sizes, "fp8_layer_bytes": fp8_sizes}
    if "bf16" in sizes:
        out["ratio_to_bf16"] = {p: n / sizes["bf16"] for p, n in sizes.items()}
    return out
