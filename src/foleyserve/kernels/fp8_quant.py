"""Float8 (e4m3) quantisation kernels: per-token activation quantisation and weight dequantisation.

Two implementations of each operation with the same bits:

- a pure-torch reference (any device; also what ``torch.compile`` sees, since Inductor fuses it
  into one kernel by itself), and
- a Triton kernel (one launch, one read and one write of the tensor) used on CUDA in eager mode
  when ``triton`` imports. Triton is optional: without it everything runs the torch path.

Semantics of :func:`quantize_per_token` for a row ``x`` (finite values):
``amax = max|x|``, ``scale = max(amax, 1e-12) / 448`` (an IEEE fp32 division) and
``q = e4m3(x / scale)`` (IEEE division, round to nearest even). ``|x / scale| <= 448`` up to one
rounding of ``scale``, so ``q`` never saturates beyond 448 (see :func:`quantize_per_token_torch`).

The Triton kernels do not rely on the hardware's (or the interpreter's) float conversions for
rounding: they snap the value onto the target grid with exact fp32/integer arithmetic first, so a
final cast only relabels an exactly representable number. That is why ``TRITON_INTERPRET=1`` (whose
numpy emulation of fp8/bf16 casts truncates instead of rounding) reproduces the GPU's bits, and why
the tests can check the kernels bit-for-bit on a CPU.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is optional: a CPU install has none, and nothing here needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

E4M3_MAX = 448.0
SCALE_FLOOR = 1e-12
# Rows wider than this are quantised in two sweeps (the second read hits L2); narrower rows are
# held in registers and read once. Every XXL/XL layer input (1536..6144) is well below it.
MAX_SINGLE_BLOCK = 16384

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_available() -> bool:
    """True when the ``triton`` package imported (the kernels may still need a GPU to run)."""
    return triton is not None


# ---------------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------------


def quantize_per_token_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of ``x [..., K]``: ``(q [..., K] e4m3, scale [..., 1] fp32)``.

    ``x ≈ q.float() * scale``. Three passes over the data in eager mode (the old form took six or
    seven fp32 passes):

    1. ``amax``: one reduction, the inf-norm, read straight from the input dtype. ``max|x|`` is exact
       in any float dtype, so there is no fp32 copy of ``x``.
    2. ``x / scale``: one read, one fp32 write (true division, IEEE-rounded on CPU and CUDA alike).
    3. the cast to e4m3 (round to nearest even): one read, one 1-byte write.

    No clamp pass: ``scale >= amax/448 * (1 - 2^-24)``, so ``|x/scale| <= 448 * (1 + 2^-23)`` after
    rounding, far below 464 where e4m3's rounding would leave 448; the cast itself lands on 448.
    """
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True).float()
    # Divide by a device tensor, not a Python number: CUDA turns division by a host scalar into a
    # multiplication by its rounded reciprocal, which can differ from the division in the last bit.
    scale = amax.clamp_min_(SCALE_FLOOR).div_(amax.new_full((1,), E4M3_MAX))
    q = torch.div(x, scale).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows_torch(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = (q.float() * scale[:, None]).to(out.dtype)`` written into ``out`` without temporaries.

    Two passes (copy, then an in-place multiply computed in fp32 and rounded once): the e4m3 ->
    bf16/fp16/fp32 copy is exact, and ``mul_`` by a float32 operand promotes to fp32 internally,
    so the bits equal the one-expression reference. 7 bytes per element of traffic instead of the
    19 of ``(q.float() * s).to(bf16)``, and no allocation.
    """
    out.copy_(q)
    return out.mul_(scale[:, None])


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _snap_e4m3(v):
        """Round fp32 ``v`` (|v| <= 448) to the nearest e4m3 value, ties to even, in exact fp32.

        The e4m3 spacing at |v| is ``2^(max(e, -6) - 3)`` (-6 is the smallest normal exponent, so
        subnormals share the spacing 2^-9). Adding ``c = 1.5 * 2^(ulp_exp + 23)`` puts ``|v|`` into a
        binade whose fp32 spacing is exactly that, so the add rounds (ties to even) to the grid and
        subtracting ``c`` is exact. No multiply is involved, so FMA contraction cannot alter it.
        """
        a = tl.abs(v)
        e = (a.to(tl.int32, bitcast=True) >> 23) - 127
        ulp_exp = tl.maximum(e, -6) - 3
        c = (((ulp_exp + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        r = (a + c) - c
        # Put v's sign bit back with integer ops: Triton's float negation is 0 - r, which would turn
        # -0.0 into +0.0 (torch keeps -0.0, e4m3 byte 0x80).
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _quant_rows_kernel(
        x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        if SINGLE:
            # The whole row in registers: one read, one write.
            offs = tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
            scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
            v = tl.math.div_rn(x, scale)
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)  # free here; a no-op for finite input
            tl.store(q_row + offs, _snap_e4m3(v).to(tl.float8e4nv), mask=mask)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            # Constexpr trip count (one compile per wide width): Triton 3.6's interpreter cannot
            # take a runtime loop bound under numpy 2, and rows this wide do not occur in the DiT.
            for i in tl.static_range(CHUNKS):
                offs = i * BLOCK + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
            for i in tl.static_range(CHUNKS):
                offs = i * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
                tl.store(q_row + offs, _snap_e4m3(v).to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _dequant_bf16_kernel(q_ptr, s_ptr, out_ptr, n_elements, n_cols, BLOCK: tl.constexpr):
        """``out = bf16(q * scale[row])`` over a contiguous ``[N, K]`` weight; ``out`` is viewed as int16.

        fp32 product (exact IEEE multiply), then round to bf16 (nearest even) by integer arithmetic
        on the fp32 bits, stored as the raw 16 bits: no float conversion decides the rounding.
        """
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs // n_cols, mask=mask, other=0.0)
        bits = (q * s).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def quantize_per_token_triton(x: torch.Tensor, *, max_block: int = MAX_SINGLE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_token_torch` as one Triton kernel (one program per row).

    ``x`` is bf16/fp16/fp32; it is viewed as ``[rows, K]`` (copied only if its last dim is strided).
    ``max_block`` is the widest row held in registers; wider rows take the two-sweep variant.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"quantize_per_token_triton takes bf16/fp16/fp32, got {x.dtype}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, cols = x2.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows and cols:
        block = triton.next_power_of_2(cols)
        single = block <= max_block
        block = block if single else max(16, triton.next_power_of_2(max_block))
        _quant_rows_kernel[(rows,)](
            x2, q, scale, cols, x2.stride(0), q.stride(0),
            BLOCK=block, SINGLE=single, CHUNKS=1 if single else triton.cdiv(cols, block), num_warps=_num_warps(block),
        )
    elif rows:  # zero-width rows: amax 0, so the floor (divided in fp32, as the kernel does)
        scale.fill_(SCALE_FLOOR).div_(scale.new_full((1,), E4M3_MAX))
    return q.view(*shape), scale.view(*shape[:-1], 1)


def dequantize_rows_triton(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *, block: int = 4096) -> torch.Tensor:
    """:func:`dequantize_rows_torch` for a bf16 ``out`` as one Triton kernel: 3 bytes per element."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if out.dtype != torch.bfloat16 or not (q.is_contiguous() and out.is_contiguous()):
        raise TypeError("dequantize_rows_triton writes a contiguous bf16 tensor from a contiguous e4m3 one")
    n = q.numel()
    if n:
        _dequant_bf16_kernel[(triton.cdiv(n, block),)](
            q, scale.contiguous(), out.view(torch.int16), n, q.shape[-1], BLOCK=block, num_warps=_num_warps(block)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor) -> bool:
    # Under torch.compile the torch form is traced instead: Inductor fuses it into one kernel (often
    # into the producer of x too), and an opaque kernel launch would only get in its way.
    return triton is not None and t.is_cuda and not torch.compiler.is_compiling()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantisation: Triton on CUDA when available, the torch reference elsewhere.

    Returns ``(q, scale)`` with ``q`` shaped like ``x`` and ``scale`` like ``x`` with a last dim of 1,
    which is the ``scale_a`` layout ``torch._scaled_mm`` wants for row-wise scaling.
    """
    if _use_triton(x) and x.dtype in _ACT_DTYPES:
        return quantize_per_token_triton(x)
    return quantize_per_token_torch(x)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``(q.float() * scale[:, None]).to(out.dtype)`` into ``out`` (same bits on every path).

    The Triton kernel (CUDA, bf16 out) moves 3 bytes per element; the torch path 7.
    """
    if _use_triton(q) and out.dtype == torch.bfloat16 and q.is_contiguous() and out.is_contiguous():
        return dequantize_rows_triton(q, scale, out)
    return dequantize_rows_torch(q, scale, out)
