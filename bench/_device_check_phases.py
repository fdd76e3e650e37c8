"""Helpers of ``bench/device_check.py`` and its phase 2 (kernels): the plan (sizes), timing, inputs,
optional packages (PyAV, the official module), clips, the profiler breakdown and the results file.
The DiT and pipeline phases are in ``_device_check_pipeline.py``; nothing here runs on its own.

Every phase function takes the check's context (``ctx``: plan, device, ``ctx.item`` to record one
measurement with its own error capture) and a results dict ``sec`` that is already part of the JSON,
so whatever a phase measured before it failed or ran out of time is kept.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

GB = 1e9  # the goals are stated in decimal gigabytes


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Sizes of every measurement: the real ones on the GPU, tiny ones for ``--smoke``."""

    smoke: bool
    seconds: float  # clip length
    steps: int  # denoising steps of a clip
    sizes: tuple[str, ...]  # DiT sizes timed per step (random_models names)
    precisions: tuple[str, ...]
    correctness: dict  # model_kwargs of the few-block model checked against the CPU
    fp8_rows: tuple[int, ...]  # M of the Fp8Linear checks
    conv_dims: tuple[int, int]  # single-block ConvMLP: w1 is d -> hidden, w2 hidden -> d (k=3)
    warmup: int
    iters: int
    matmul_n: int
    copy_bytes: int
    offload_rows: tuple[int, ...]  # model rows (a CFG pair counts 2)
    offload_steps: int
    peak_steps: int
    compile_steps: int
    e2e_size: str
    warm_runs: bool = True  # an uncounted generation first (cuDNN/cuBLAS set-up); off in --smoke
    text_len: int = 77  # a compiled engine pads every prompt to CLAP's 77 tokens
    batch: int = 2  # model rows of one request with CFG


def make_plan(smoke: bool) -> Plan:
    from foleyserve.models.dit import tiny_config, xxl_config
    from foleyserve.models.layers import conv_mlp_hidden

    if smoke:
        tiny = tiny_config()
        return Plan(True, 2.0, 2, ("tiny",), ("bf16", "fp8", "fp8-weight-only"), tiny, (100, 16, 15, 7),
                    (128, conv_mlp_hidden(4 * 128)), 1, 2, 256, 1 << 22, (2, 4), 2, 2, 2, "tiny", warm_runs=False)
    xxl = {**xxl_config(), "depth_triple_blocks": 2, "depth_single_blocks": 2}
    d = xxl["hidden_size"]
    return Plan(False, 10.0, 50, ("xxl", "xl"), ("bf16", "fp8", "fp8-weight-only"), xxl, (1000, 160, 154, 7),
                (d, conv_mlp_hidden(4 * d)), 3, 10, 8192, 1 << 30, (2, 32), 3, 3, 10, "xxl")


# ----------------------------------------------------------------------------- small helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median/min milliseconds of ``fn``: CUDA events around each call on a GPU (the host may run
    ahead, so a launch-bound call shows its real gaps), the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    ms: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in ev]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "iters": iters}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (NaN/inf show up as such, never pass)."""
    from foleyserve.fidelity_measures import rel_l2

    return rel_l2(a.detach().double().cpu(), b.detach().double().cpu())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_dit(model_kwargs: dict, device: torch.device | str, dtype: torch.dtype, seed: int):
    """A DiT with random weights, filled the fast way random_models does (seeded pool)."""
    from foleyserve.models.dit import build_dit

    try:
        from foleyserve.pipeline.random_models import _dit_scale, pool_fill_
    except ImportError:  # the fast filler moved: the plain seeded init is slower but equivalent
        return build_dit(model_kwargs, dtype=dtype, device=device, seed=seed)
    model = build_dit(model_kwargs, device="meta").to(dtype=dtype).to_empty(device=device)
    return pool_fill_(model, _dit_scale, seed).eval()


def dit_inputs(cfg, seconds: float, text_len: int, batch: int, device, seed: int = 0) -> dict[str, Any]:
    """Model-call inputs of one clip: latents, times and the three conditioning streams."""
    from foleyserve.pipeline.lengths import clip_lengths

    n = clip_lengths(seconds)
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, cfg.audio_vae_latent_dim, n["audio_len"], generator=g),
        "t": torch.full((batch,), 500.0),
        "clip_feat": torch.randn(batch, n["visual_len"], cfg.clip_dim, generator=g),
        "sync_feat": torch.randn(batch, n["sync_len"], cfg.sync_feat_dim, generator=g),
        "cond": torch.randn(batch, text_len, cfg.condition_dim, generator=g),
    }
    out = {k: v.to(device) for k, v in out.items()}
    out["lengths"] = {**n, "text_len": text_len}
    return out


def autocast_of(dit) -> contextlib.AbstractContextManager:
    from foleyserve.pipeline.sampler import _autocast_for

    return _autocast_for(dit)


@torch.no_grad()
def run_ours(dit, inp: dict) -> torch.Tensor:
    """One model call as the sampler makes it: conditions prepared once, then ``predict_flow``."""
    with autocast_of(dit):
        c = dit.prepare_conditions(clip_feat=inp["clip_feat"], sync_feat=inp["sync_feat"], cond=inp["cond"],
                                   audio_len=inp["x"].shape[-1])
        return dit.predict_flow(inp["x"], inp["t"], c).float()


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- optional packages


def prepare_av(force_stub: bool) -> dict[str, Any]:
    """Make ``foleyserve.media`` importable without PyAV (the GPU image has none unless carried).

    The engine imports media at the top; only decode and mux use PyAV. A stub module stands in
    for it; any use of it raises, so the end-to-end phase must feed decoded frames itself.
    transformers is imported first, so that its own probe for PyAV still sees none.
    """
    import transformers  # noqa: F401

    if not force_stub:
        try:
            import av

            return {"available": True, "version": getattr(av, "__version__", "?"), "stub": False}
        except ImportError:
            pass

    def missing(name: str):
        # AttributeError, so that probes such as hasattr(av, "__file__") (inspect does that) see "no".
        raise AttributeError(f"PyAV is not installed here: av.{name} is a stub (no decode, no mux)")

    stub = types.ModuleType("av")
    stub.__getattr__ = missing  # type: ignore[attr-defined]
    stub.__spec__ = importlib.machinery.ModuleSpec("av", None)
    sys.modules["av"] = stub
    return {"available": False, "version": None, "stub": True}


def import_official(repo: Path) -> types.ModuleType:
    """``hunyuanvideo_foley.models.hifi_foley`` from a source folder, without running the package's
    ``__init__`` (it imports the whole official pipeline: loguru, torchaudio, ...). Needs diffusers
    and einops."""
    if not (repo / "hunyuanvideo_foley" / "models" / "hifi_foley.py").is_file():
        raise FileNotFoundError(f"{repo} has no hunyuanvideo_foley/models/hifi_foley.py")
    if "hunyuanvideo_foley" not in sys.modules:
        pkg = types.ModuleType("hunyuanvideo_foley")
        pkg.__path__ = [str(repo / "hunyuanvideo_foley")]  # a plain package path; __init__ skipped
        sys.modules["hunyuanvideo_foley"] = pkg
    return importlib.import_module("hunyuanvideo_foley.models.hifi_foley")


def official_step(official, x2: torch.Tensor, t2: torch.Tensor, clip2, sync2, cond2, dtype) -> torch.Tensor:
    ctx = torch.autocast(device_type=x2.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return official(x=x2, t=t2, clip_feat=clip2, cond=cond2, sync_feat=sync2)["x"].float()


# ----------------------------------------------------------------------------- clips


def _bars(i: int, w: int, h: int):
    import numpy as np

    x, y = np.arange(w)[None, :, None], np.arange(h)[:, None, None]
    planes = [(x * 2 + i * 4) % 256, (y * 3 + i * 2) % 256, np.full((1, 1, 1), (i * 7) % 256)]
    return np.ascontiguousarray(np.concatenate([np.broadcast_to(p, (h, w, 1)) for p in planes], axis=2).astype(np.uint8))


def make_clip(path: Path, seconds: float, *, fps: int = 25, size: tuple[int, int] = (320, 240)) -> Path:
    """A clip of moving colour bars with no audio track (H.264 when PyAV's FFmpeg has an encoder for it)."""
    from fractions import Fraction

    import av

    w, h = size
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=Fraction(fps, 1))
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                for i in range(int(round(seconds * fps))):
                    for packet in stream.encode(av.VideoFrame.from_ndarray(_bars(i, w, h), format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return path
        except (av.FFmpegError, ValueError):  # encoder not in this FFmpeg build: try the next
            continue
    raise RuntimeError("PyAV has none of the encoders libx264, h264, mpeg4")  # "PyAV" marks it as a media failure


def synthetic_decoded(seconds: float, *, size: tuple[int, int] = (320, 240)):
    """What ``media.decode_frames`` returns for a ``seconds`` clip, made without PyAV."""
    import dataclasses
    from fractions import Fraction

    import numpy as np

    from foleyserve import media

    w, h = size
    frames = {fps: np.stack([_bars(i, w, h) for i in range(int(round(seconds * fps)))]) for fps in (8, 25)}
    known = dict(duration=seconds, frame_rate=Fraction(25), fps=25.0, num_frames=len(frames[25]), width=w, height=h,
                 has_video=True, has_audio=False, container="synthetic")
    info = media.VideoInfo(**{f.name: known.get(f.name) for f in dataclasses.fields(media.VideoInfo)})
    return media.DecodedVideo(frames=frames, duration=seconds, last_frame_time=(len(frames[25]) - 1) / 25, info=info)


# ----------------------------------------------------------------------------- results file


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings (strict parsers reject NaN), odd objects as str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- profiler


_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|attn")),
    ("conv", re.compile(r"conv(?!ert)|fprop|implicit_convolve|winograd")),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|addmm|aten::mm|aten::bmm|scaled_mm|gemv|sm90_")),
)


def kernel_kind(name: str) -> str:
    n = name.lower()
    for kind, pattern in _KINDS:
        if pattern.search(n):
            return kind
    return "other"


def kernel_breakdown(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One call of ``fn`` under torch.profiler: device kernels (count and time) by kind.

    On a CPU there are no kernels; the aten ops are classified instead (nested ops counted too), so
    the smoke run exercises this code with a different meaning.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    kinds = {k: {"count": 0, "ms": 0.0} for k in ("gemm", "conv", "attention", "other")}
    top = []
    for evt in prof.key_averages():
        if cuda:
            if getattr(evt, "device_type", None) != DeviceType.CUDA:
                continue
            # The attribute names moved between releases (cuda_* -> device_*); a kernel has no children.
            us = next((v for v in (getattr(evt, a, None) for a in ("self_device_time_total", "device_time_total",
                                                                 "self_cuda_time_total", "cuda_time_total")) if v), 0.0)
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        k = kinds[kernel_kind(evt.key)]
        k["count"] += evt.count
        k["ms"] += us / 1e3
        top.append((us / 1e3, evt.count, evt.key[:140]))
    total_ms = sum(k["ms"] for k in kinds.values())
    for k in kinds.values():
        k["share"] = k["ms"] / total_ms if total_ms else None
    top.sort(reverse=True)
    return {
        "what": "device kernels per step" if cuda else "aten ops on the CPU (smoke: not kernels)",
        "launches": sum(k["count"] for k in kinds.values()),
        "kernel_ms": total_ms,
        "by_kind": kinds,
        "top": [{"ms": round(ms, 4), "count": c, "name": n} for ms, c, n in top[:12]],
    }


def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Any, torch.Tensor]:
    """``fn`` captured in one CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# ----------------------------------------------------------------------------- phase 2: kernels


def phase_kernels(ctx, sec: dict) -> None:
    plan, dev = ctx.plan, ctx.device
    cuda = dev.type == "cuda"
    d, hidden = plan.conv_dims
    for m in plan.fp8_rows:
        ctx.item(sec.setdefault("fp8_linear", {}), f"M={m}", lambda m=m: _fp8_linear(ctx, m, d, 3 * d, tap=False))
    for m in plan.fp8_rows:
        ctx.item(sec.setdefault("fp8_tap_linear", {}), f"M={m}", lambda m=m: _fp8_linear(ctx, m, d, hidden, tap=True))
    batch, la = plan.batch, _audio_len(plan.seconds)
    ctx.item(sec, "conv_w1", lambda: _conv_variants(ctx, batch, la, d, hidden))
    ctx.item(sec, "conv_w2", lambda: _conv_variants(ctx, batch, la, hidden, d))
    ctx.item(sec, "fp8_quant_kernels", lambda: _triton_quant(ctx) if cuda else "skipped: no cuda")
    ctx.item(sec, "sdpa", lambda: _sdpa_backends(ctx))


def _audio_len(seconds: float) -> int:
    from foleyserve.pipeline.lengths import clip_lengths

    return clip_lengths(seconds)["audio_len"]


def _fp8_layer(weight, bias, tap: bool, fast: bool | None = None):
    from foleyserve import precision as P

    kw = {} if fast is None else {"use_fast_accum": fast}
    if tap:
        from foleyserve.models.layers import TapLinear

        if not hasattr(P, "Fp8TapLinear"):
            raise RuntimeError("foleyserve.precision has no Fp8TapLinear")
        return P.Fp8TapLinear.from_tap(TapLinear(weight, bias, 3), True, torch.bfloat16, **kw)
    return P.Fp8Linear(weight, bias, True, torch.bfloat16, **kw)


def _fp8_linear(ctx, m: int, k: int, n: int, *, tap: bool) -> dict[str, Any]:
    """The fp8 layer on this device against the same layer's CPU path (the fallback, float32
    arithmetic on the same quantised operands) and against fp64 of the unquantised product."""
    from foleyserve import precision as P

    dev, plan = ctx.device, ctx.plan
    g = torch.Generator().manual_seed(m)
    rows = 3 * n if tap else n  # a tap weight is tap-major [3*Cout, Cin]
    w = (torch.randn(rows, k, generator=g) * k**-0.5).to(torch.bfloat16)
    b = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, m, k, generator=g).to(torch.bfloat16)  # [B, L, K]: tokens for a tap layer
    layer = _fp8_layer(w.to(dev), b.to(dev), tap)
    xd = x.to(dev)
    with torch.no_grad():
        y = layer(xd)
        cpu = _fp8_layer(w, b, tap)
        y_cpu = cpu(x)
    x64, w64, b64 = x.to(dev, torch.float64), w.to(dev, torch.float64), b.to(dev, torch.float64)  # fp64 is fast on an H200
    if tap:
        ref = F.conv1d(x64.transpose(1, 2), w64.view(3, n, k).permute(1, 2, 0), b64, padding=1).transpose(1, 2)
    else:
        ref = x64 @ w64.t() + b64
    out: dict[str, Any] = {"M": m, "K": k, "N": n, "out_dtype": str(y.dtype)}
    layer_mm = getattr(layer, "_on_tensor_cores", None)
    out["scaled_mm"] = bool(layer_mm(dev)) if callable(layer_mm) else None
    out["fallback_rel_l2_vs_fp64"] = rel(y_cpu, ref)
    if dev.type == "cuda":
        out["rel_l2_vs_fallback"] = rel(y, y_cpu)
        out["rel_l2_vs_fp64"] = rel(y, ref)
        wb, bb = w.to(dev), b.to(dev)
        with torch.no_grad():
            out["time"] = timeit(lambda: layer(xd), dev, plan.warmup, plan.iters)
            if not tap:
                out["bf16_linear_time"] = timeit(lambda: F.linear(xd, wb, bb), dev, plan.warmup, plan.iters)
        if m == plan.fp8_rows[0] and accepts(P.Fp8Linear.__init__, "use_fast_accum"):
            fast = _fp8_layer(w.to(dev), b.to(dev), tap, fast=True)
            with torch.no_grad():
                y_fast = fast(xd)
                out["fast_accum"] = {"rel_l2_vs_fp64": rel(y_fast, ref), "rel_l2_vs_accurate": rel(y_fast, y),
                                     "time": timeit(lambda: fast(xd), dev, plan.warmup, plan.iters)}
    else:
        out["rel_l2_vs_fallback"] = "skipped: no cuda"
    return out


def _conv_variants(ctx, batch: int, length: int, cin: int, cout: int) -> dict[str, Any]:
    """One k=3 token conv of the single blocks, five ways, each against fp64 of the same bf16 operands."""
    from foleyserve import precision as prec
    from foleyserve.models.layers import TapLinear

    dev, plan = ctx.device, ctx.plan
    g = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(batch, length, cin, generator=g).to(dev, torch.bfloat16)  # token-major, as the model holds it
    conv = torch.nn.Conv1d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(cout, cin, 3, generator=g) * (3 * cin) ** -0.5)
    conv = conv.to(dev, torch.bfloat16)
    w = conv.weight.detach()
    ref = F.conv1d(x.double().transpose(1, 2), w.double(), padding=1).transpose(1, 2)
    w4 = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # laid out once, as a fused model would hold it
    w_unfold = w.reshape(cout, cin * 3)  # index c*3 + j, the order unfold produces
    tap = TapLinear.from_convs(conv)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "as_is_conv1d_on_transpose": lambda: F.conv1d(x.transpose(1, 2), w, padding=1).transpose(1, 2),
        # [B, L, C] seen as NCHW [B, C, 1, L] is already channels-last: no copy of the input.
        "channels_last_conv2d": lambda: F.conv2d(x.transpose(1, 2).unsqueeze(2), w4, padding=(0, 1)).squeeze(2).transpose(1, 2),
        "unfold_gemm": lambda: F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 1).reshape(batch, length, cin * 3) @ w_unfold.t(),
        "tap_gemm_shifted_add": lambda: tap(x),
    }
    out: dict[str, Any] = {"shape": f"B={batch} L={length} {cin}->{cout} k=3 bf16",
                           "input_is_channels_last": x.transpose(1, 2).unsqueeze(2).is_contiguous(memory_format=torch.channels_last)}
    try:
        fp8 = _fp8_layer(tap.weight, None, True)
        variants["fp8_tap"] = lambda: fp8(x)
        if accepts(prec.Fp8Linear.__init__, "use_fast_accum"):
            fast = _fp8_layer(tap.weight, None, True, fast=True)
            variants["fp8_tap_fast_accum"] = lambda: fast(x)
    except Exception as e:  # noqa: BLE001 - the fp8 layers are being reworked; record and go on
        out["fp8_tap"] = f"error: {first_line(e)}"
    flops = 2 * batch * length * cin * cout * 3
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                y = fn()
                t = timeit(fn, dev, plan.warmup, plan.iters)
            out[name] = {"rel_l2_vs_fp64": rel(y, ref), **t, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001
            out[name] = f"error: {first_line(e)}"
    return out


def _triton_quant(ctx) -> Any:
    """The Triton fp8 (de)quantisation kernels against their torch references: bit equality, time."""
    try:
        from foleyserve.kernels import fp8_quant as fq
    except ImportError as e:
        return f"skipped: no foleyserve.kernels ({e})"
    if not fq.triton_available():
        return "skipped: triton not importable"
    dev, plan = ctx.device, ctx.plan
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(7)
    for rows, cols in ((1000, 1536), (1000, 6144), (154, 4096), (7, 1536), (64, 20000)):
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, rows)[:, None]).to(dev, dtype)
            x[0] = 0  # an all-zero row takes the scale floor
            key = f"{rows}x{cols} {str(dtype).removeprefix('torch.')}"
            try:
                qt, st = fq.quantize_per_token_triton(x)
                qr, sr = fq.quantize_per_token_torch(x)
                diff = int((qt.view(torch.uint8) != qr.view(torch.uint8)).sum())
                out[key] = {"bit_equal": diff == 0 and torch.equal(st, sr), "q_mismatches": diff,
                            "triton": timeit(lambda: fq.quantize_per_token_triton(x), dev, plan.warmup, plan.iters),
                            "torch": timeit(lambda: fq.quantize_per_token_torch(x), dev, plan.warmup, plan.iters)}
            except Exception as e:  # noqa: BLE001
                out[key] = f"error: {first_line(e)}"
    if hasattr(fq, "dequantize_rows_triton"):
        w = torch.randn(4096, 1536, generator=g).to(dev)
        q, s = fq.quantize_per_token_torch(w)
        s = s.squeeze(-1)
        a, b = torch.empty(q.shape, dtype=torch.bfloat16, device=dev), torch.empty(q.shape, dtype=torch.bfloat16, device=dev)
        fq.dequantize_rows_triton(q, s, a)
        fq.dequantize_rows_torch(q, s, b)
        out["dequant 4096x1536 bf16"] = {
            "bit_equal": torch.equal(a.view(torch.int16), b.view(torch.int16)),
            "triton": timeit(lambda: fq.dequantize_rows_triton(q, s, a), dev, plan.warmup, plan.iters),
            "torch": timeit(lambda: fq.dequantize_rows_torch(q, s, b), dev, plan.warmup, plan.iters),
        }
    return out


def _sdpa_backends(ctx) -> dict[str, Any]:
    """Each SDPA backend at the model's attention shapes, against fp32 math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from foleyserve.pipeline.lengths import clip_lengths

    plan, dev = ctx.plan, ctx.device
    cfg = plan.correctness
    h = cfg["num_heads"]
    hd = cfg["hidden_size"] // h
    n = clip_lengths(plan.seconds)
    la, lv, lt = n["audio_len"], n["visual_len"], plan.text_len
    shapes = {"joint_self": (la + lv, la + lv, False), "single_self": (la, la, False),
              "cross_text": (la + lv, lt, False), "cross_text_masked": (la + lv, lt, True)}
    names = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, b)]
    g = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {}
    for label, (lq, lk, masked) in shapes.items():
        q = torch.randn(plan.batch, h, lq, hd, generator=g).to(dev, torch.bfloat16)
        k = torch.randn(plan.batch, h, lk, hd, generator=g).to(dev, torch.bfloat16)
        v = torch.randn(plan.batch, h, lk, hd, generator=g).to(dev, torch.bfloat16)
        mask = None
        if masked:  # padded prompts: the second row's last keys are padding
            mask = torch.ones(plan.batch, 1, 1, lk, dtype=torch.bool, device=dev)
            mask[-1, ..., lk // 2:] = False
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        row: dict[str, Any] = {"shape": f"B={plan.batch} H={h} Lq={lq} Lk={lk} D={hd} bf16" + (" bool mask" if masked else "")}
        for name in ["default", *names]:
            if masked and name == "CUDNN_ATTENTION":
                # A bad kernel here could leave a sticky CUDA error; the model never masks through cuDNN.
                row[name.lower()] = "not tried with a mask"
                continue
            ctxm = contextlib.nullcontext() if name == "default" else sdpa_kernel(getattr(SDPBackend, name))
            try:
                with ctxm:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    t = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), dev, plan.warmup, plan.iters)
                row[name.lower()] = {"rel_l2_vs_fp32_math": rel(y, ref), **t}
            except Exception as e:  # noqa: BLE001 - "not supported for these inputs" is a result
                row[name.lower()] = f"unavailable: {first_line(e)}"
        out[label] = row
    return out
