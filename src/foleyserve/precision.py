"""Precision policies for the denoiser: which layers run in which precision, and how.

``apply_policy(dit, precision)`` converts a loaded :class:`~foleyserve.models.dit.FoleyDiT` in place:

- ``fp32``: everything float32 (the reference path).
- ``bf16`` / ``fp16``: weights in the low dtype and the model run under autocast, as the official
  code runs bf16 — except the layers matched by ``keep_fp32``, whose weights stay float32 and whose
  forward runs with autocast off on float32 inputs.
- ``fp8``: the matmul-heavy layers of the blocks (attention projections, MLPs and the kernel-3
  Conv1d projections of the single blocks, the latter unfolded into one GEMM) hold float8 e4m3
  weights with one scale per output channel, and quantise their input per token at run time. On GPUs
  with FP8 tensor cores (compute capability 8.9+) the product runs in ``torch._scaled_mm``;
  elsewhere a dequantising fallback computes the same quantised product in float32. Everything
  else runs as the bf16 policy.
- ``fp8-weight-only``: the same float8 weights (half the bf16 weight memory), dequantised to bf16
  on the fly; activations are not quantised. Works on any device; saves memory, not time.

Numerics that are already computed in float32 by the model whatever the policy (RMS/QK norms,
RoPE, the sinusoidal timestep features, the sampler's Euler update and CFG) are untouched.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from foleyserve.models.layers import TokenConv1d

POLICIES = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Layers kept in float32 under the low-precision policies (module-name patterns; a pattern also
# covers the module's children). The time embedding feeds every modulation of every block and the
# final projection writes the velocity itself; both are tiny, so float32 costs nothing measurable.
DEFAULT_KEEP_FP32: tuple[str, ...] = ("time_in", "final_layer")

# Layers given float8 weights under the fp8 policies: the blocks' linear and conv projections.
# Modulation producers are left in bf16 by default: they set every shift/scale/gate and quantising
# them costs more fidelity than their share of the FLOPs buys (see BENCHMARKS.md, fidelity table).
DEFAULT_FP8_LAYERS: tuple[str, ...] = ("triple_blocks.*", "single_blocks.*")
DEFAULT_FP8_EXCLUDE: tuple[str, ...] = ("*.audio_mod.linear", "*.v_cond_mod.linear", "*.modulation.linear")

E4M3_MAX = 448.0


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def fp8_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` runs e4m3 GEMMs on tensor cores (Ada, Hopper and later)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# ---------------------------------------------------------------------------------------------
# Float8 layers
# ---------------------------------------------------------------------------------------------


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales with one scale per row (``w ≈ q * scale[:, None]``)."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    q = (wf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1)


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with e4m3 weights (per-output-channel scales).

    ``quantize_input`` True: the input is quantised per token too and the product runs on FP8
    tensor cores where available (else the same quantised product in float32). False: weight-only,
    dequantised to the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantize_input: bool, out_dtype: torch.dtype) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        self.quantize_input = quantize_input
        self.out_dtype = out_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def extra_repr(self) -> str:
        mode = "w8a8" if self.quantize_input else "w8"
        return f"in={self.in_features}, out={self.out_features}, {mode}, out_dtype={self.out_dtype}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not self.quantize_input:
            dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.out_dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            y = F.linear(x2.to(dtype), self.dequantized_weight(dtype), bias)
            return y.reshape(*shape[:-1], -1)
        xf = x2.float()
        x_scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        xq = (xf / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        if fp8_supported(x.device) and self.out_dtype in (torch.bfloat16, torch.float16):
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale[None, :],
                bias=self.bias,
                out_dtype=self.out_dtype,
            )
        else:
            # The same quantised operands, multiplied in float32 (autocast off, or it would round
            # them to bf16): what the tensor cores compute, up to their accumulation order.
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = (xq.float() * x_scale) @ (self.weight.float() * self.weight_scale[:, None]).t()
                if self.bias is not None:
                    y = y + self.bias.float()
            y = y.to(self.out_dtype)
        return y.reshape(*shape[:-1], -1)


def _shift_tokens(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[:, t] = x[:, t + offset]`` with zeros outside (the conv's zero padding)."""
    if offset == 0:
        return x
    pad = torch.zeros_like(x[:, : abs(offset)])
    if offset > 0:
        return torch.cat((x[:, offset:], pad), 1)
    return torch.cat((pad, x[:, :offset]), 1)


class Fp8TokenConv1d(nn.Module):
    """A token-major Conv1d (stride 1, 'same' padding) run as one GEMM over unfolded taps.

    For kernel k the input rows ``x[t-p], ..., x[t+p]`` are concatenated along channels and the
    weight ``[Cout, Cin, k]`` is laid out as ``[Cout, k*Cin]`` to match, which is the convolution
    exactly (in exact arithmetic), so FP8 GEMMs cover the conv layers too.
    """

    def __init__(self, conv: nn.Conv1d, quantize_input: bool, out_dtype: torch.dtype) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        if conv.stride != (1,) or conv.dilation != (1,) or conv.groups != 1 or conv.padding != (k // 2,) or k % 2 == 0:
            raise ValueError(f"only stride-1, odd-kernel 'same' convs unfold into a GEMM; got {conv}")
        self.kernel_size = k
        w = conv.weight.detach().permute(0, 2, 1).reshape(conv.out_channels, k * conv.in_channels)
        self.gemm = Fp8Linear(w, conv.bias, quantize_input, out_dtype)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        half = self.kernel_size // 2
        return torch.cat([_shift_tokens(x, off) for off in range(-half, half + 1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(self.unfold(x))


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
    precision: str
    autocast_dtype: torch.dtype | None
    kept_fp32: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None,
            "kept_fp32": self.kept_fp32,
            "fp8_layers": len(self.fp8),
            "fp8": self.fp8,
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
        }


def module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_policy(
    dit: nn.Module,
    precision: str,
    *,
    keep_fp32: Iterable[str] | None = None,
    fp8_layers: Iterable[str] | None = None,
    fp8_exclude: Iterable[str] | None = None,
) -> PolicyReport:
    """Convert ``dit`` in place to ``precision`` (one of :data:`POLICIES`) and say what went where.

    ``keep_fp32``: module-name patterns kept in float32 (default :data:`DEFAULT_KEEP_FP32`; pass
    ``[]`` for the official all-bf16 numerics). ``fp8_layers``/``fp8_exclude``: which ``nn.Linear``
    and ``TokenConv1d`` layers get float8 weights under the fp8 policies.
    """
    if precision not in POLICIES:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(POLICIES)}")
    report = PolicyReport(precision=precision, autocast_dtype=None, bytes_before=module_bytes(dit))
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
        for name, module in list(dit.named_modules()):
            if not _matches(name, include) or _matches(name, exclude) or _matches(name, keep):
                continue
            if isinstance(module, TokenConv1d):
                _replace(dit, name, Fp8TokenConv1d(module, quantize_input, low))
            elif isinstance(module, nn.Linear):
                _replace(dit, name, Fp8Linear(module.weight.detach(), module.bias, quantize_input, low))
            else:
                continue
            report.fp8.append(name)
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
