"""Float8 quantisation kernels: the torch reference's semantics, and the Triton kernels bit-for-bit
against it under Triton's CPU interpreter (``TRITON_INTERPRET=1``, in a subprocess so the variable
is set before triton is imported)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from foleyserve.kernels import E4M3_MAX, dequantize_rows, dequantize_rows_torch, quantize_per_token, quantize_per_token_torch

SRC = Path(__file__).resolve().parents[1] / "src"


def _rows(n: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows spanning 12 decades (e4m3 subnormals included), one all-zero row and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.logspace(-9, 3, n)[:, None]
    if n > 2:
        x[n // 2] = 0.0
    x[0, 0] = -0.0
    return x.to(dtype)


def _old_formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantisation as first written (six fp32 passes): the semantics the fast forms must keep."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (7, 1536), (154, 96), (2, 5, 40)])
def test_torch_reference_keeps_the_original_semantics(dtype, shape):
    x = _rows(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1], dtype).view(shape)
    q, scale = quantize_per_token_torch(x)
    q_old, scale_old = _old_formula(x)
    assert q.shape == x.shape and scale.shape == (*x.shape[:-1], 1) and scale.dtype == torch.float32
    assert torch.equal(scale, scale_old)
    assert _same_bytes(q, q_old)  # bit for bit, though without the clamp pass (see its docstring)


def test_quantisation_edge_cases():
    x = _rows(7, 64, torch.float32)
    q, scale = quantize_per_token_torch(x)
    assert torch.all(q[3].float() == 0) and scale[3].item() == pytest.approx(1e-12 / 448)  # the zero row
    assert q.view(torch.uint8)[0, 0] == 0x80  # -0.0 stays negative zero
    nonzero = [i for i in range(7) if i != 3]
    # each row's largest magnitude maps to exactly 448: never past it, never NaN
    assert torch.all(q[nonzero].float().abs().amax(-1) == E4M3_MAX)
    back = q.float() * scale
    err = (back - x).norm(dim=-1)[nonzero] / x.norm(dim=-1)[nonzero]
    assert err.max() < 0.04  # 3 mantissa bits


def test_cpu_dispatch_is_the_torch_reference():
    x = _rows(9, 48, torch.bfloat16)
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_torch(x)
    assert _same_bytes(q, q_ref) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantisation_into_a_buffer_is_the_reference(dtype):
    w = _rows(40, 72, torch.float32, seed=1)
    q, scale = quantize_per_token_torch(w)
    scale = scale.squeeze(-1)
    buf = torch.empty(40 * 72 + 17, dtype=dtype)
    out = buf[: 40 * 72].view(40, 72)
    result = dequantize_rows(q, scale, out)
    assert result.data_ptr() == buf.data_ptr()  # written in place, nothing allocated for the result
    ref = (q.float() * scale[:, None]).to(dtype)
    assert torch.equal(result, ref) and torch.equal(dequantize_rows_torch(q, scale, torch.empty_like(ref)), ref)


# -- Triton kernels under the interpreter ------------------------------------------------------

_INTERPRETED = textwrap.dedent(
    """
    import json, sys
    import torch
    from foleyserve.kernels import fp8_quant as K

    def rows(n, width, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, width, generator=g) * torch.logspace(-9, 3, n)[:, None]
        if n > 2:
            x[n // 2] = 0.0
        x[0, 0] = -0.0
        return x.to(dtype)

    def same(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    failures, cases = [], 0
    # (rows, width, max_block): max_block below the width takes the two-sweep (wide-row) variant.
    shapes = [(1, 64, 16384), (7, 4096, 16384), (33, 1536, 16384), (154, 1536, 16384), (1000, 64, 16384),
              (7, 200, 64), (1, 1, 16384)]
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for seed, (n, width, max_block) in enumerate(shapes):
            x = rows(n, width, dtype, seed)
            q, s = K.quantize_per_token_triton(x, max_block=max_block)
            q_ref, s_ref = K.quantize_per_token_torch(x)
            cases += 1
            if not (torch.equal(s, s_ref) and same(q, q_ref)):
                failures.append(f"quantize {dtype} {n}x{width} block<={max_block}: scales equal {torch.equal(s, s_ref)}, "
                                f"{int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())} bytes differ")
    for n, width in ((40, 72), (24, 1536)):
        w = rows(n, width, torch.float32, 7)
        q, s = K.quantize_per_token_torch(w)
        s = s.squeeze(-1)
        out = torch.empty(n, width, dtype=torch.bfloat16)
        K.dequantize_rows_triton(q, s, out, block=512)
        cases += 1
        if not same(out, (q.float() * s[:, None]).to(torch.bfloat16)):
            failures.append(f"dequantize {n}x{width}")
    print(json.dumps({"cases": cases, "failures": failures}))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_the_torch_reference_bit_for_bit():
    """bf16/fp32/fp16 input, 1-1000 rows, widths 1-4096, a zero row, -0.0 and e4m3 subnormals; and the
    bf16 weight dequantisation. Small shapes: the interpreter runs every program in numpy."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [] and result["cases"] == 23
