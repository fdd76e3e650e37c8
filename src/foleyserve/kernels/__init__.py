"""Hand-written kernels (optional Triton) with pure-torch references of identical semantics."""

from foleyserve.kernels.fp8_quant import (
    E4M3_MAX,
    dequantize_rows,
    dequantize_rows_torch,
    quantize_per_token,
    quantize_per_token_torch,
    triton_available,
)

__all__ = [
    "E4M3_MAX",
    "dequantize_rows",
    "dequantize_rows_torch",
    "quantize_per_token",
    "quantize_per_token_torch",
    "triton_available",
]
