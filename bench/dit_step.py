#!/usr/bin/env python3
"""DiT time per denoising step: ours, and the official model side by side on the same weights.

One step is one model call at batch 2 (the CFG pair), as the sampler makes it. For ours that is
``FoleyDiT.predict_flow`` with the step-invariant conditioning (text/visual/sync embeddings, text
K/V, RoPE tables) prepared once per request, as ``sample_latents`` does; the official loop calls
the whole ``HunyuanVideoFoley.forward`` every step, so the official column is that forward.

    python bench/dit_step.py                                   # tiny, 8 s and 10 s, every policy
    python bench/dit_step.py --sizes tiny,xl --precisions fp32,bf16 --repeats 2 \\
        --reference-repo /tmp/official --json bench/results/dit_step_cpu.json

Weights are seeded random ones at the real sizes (``foleyserve.pipeline.random_models``). With
``--reference-repo`` (a local checkout of Tencent-Hunyuan/HunyuanVideo-Foley; it needs
``pip install diffusers einops``) the official class is built from the same model_kwargs and given
OUR state dict (the keys are identical by design; the tensors are shared, not copied), timed in
the same run with the runs interleaved (ours, official, ours, official, ...), and the outputs are
compared. Each row is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones.

``--compiled`` adds a third column, interleaved with the other two: the same step run by the
compiled step runner (``foleyserve.pipeline.stepgraph.StepGraphs``, Inductor; on CUDA also captured
in a CUDA graph), i.e. ``euler_cfg_step`` as ``sample_latents(..., runner=StepGraphs())`` runs it:
the CFG pair's model call plus the guidance combine and the Euler update (a few elementwise ops on
the ``[1, 128, La]`` latents on top of the model call). The first call, which compiles, is timed
separately (``compiled_first_call_s``) and is not a timed repeat; the graphs dynamo compiled and
its graph breaks during that call are recorded (``compiled_graphs``, ``compiled_graph_breaks``),
and the compiled step's output is compared with the same step run eagerly.

Ours always runs the engine's inference layout: the precision policy is applied for fp32 too
(``apply_policy`` calls ``fuse_for_inference``: tap-GEMM convs, fused w1|w3), as the engine does.

Also home of :func:`dit_flops`, the analytic FLOP count of one DiT call (used by bench/device_check.py).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from foleyserve.models.layers import conv_mlp_hidden  # noqa: E402

POLICIES = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
OFFICIAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- FLOPs


def clip_lengths(seconds: float) -> dict[str, int]:
    """Token counts of a clip under the official length rules (see the research notes, section 7)."""
    frames25 = int(round(seconds * 25))
    if frames25 < 16:
        raise ValueError(f"a {seconds} s clip has fewer than 16 frames at 25 fps; Synchformer needs 16")
    return {
        "audio_len": int(frames25 / 25 * 50),
        "visual_len": int(round(seconds * 8)),
        "sync_len": 8 * ((frames25 - 16) // 8 + 1),
    }


def dit_flops(
    config: Mapping[str, Any],
    *,
    audio_len: int,
    visual_len: int,
    sync_len: int,
    text_len: int,
    batch: int = 2,
    mode: str = "official",
) -> dict[str, float]:
    """FLOPs (2 x multiply-accumulates of every matmul, conv and attention product) of one DiT call.

    ``mode="official"`` counts what the official ``forward`` computes each call: every embedding,
    every block's text K/V, both streams in the last triple block, the per-token single-block
    modulation on all audio tokens and the final layer's (dead) adaLN. ``mode="ours"`` counts one
    ``predict_flow`` step: the step-invariant work is done once per request, the last triple block
    computes only what reaches the audio output, and the single-block modulation runs on the
    distinct sync rows. MFU is conventionally quoted against the official (model) count.

    Returns the total and its parts: attention, conv_k3 (the single blocks' kernel-3 convs),
    modulation, triple, single, embed, final.
    """
    if mode not in ("official", "ours"):
        raise ValueError(f"mode must be 'official' or 'ours', got {mode!r}")
    d = int(config["hidden_size"])
    n_triple, n_single = int(config["depth_triple_blocks"]), int(config["depth_single_blocks"])
    mlp = int(d * float(config.get("mlp_ratio", 4.0)))
    conv_hidden = conv_mlp_hidden(mlp)  # single blocks' ConvMLP (kernel 3)
    sync_hidden = conv_mlp_hidden(4 * d)  # sync_in's ConvMLP
    sync_k = int(config.get("sync_in_ksz", 1))
    channels = int(config.get("audio_vae_latent_dim", 128))
    clip_dim, cond_dim, sync_dim = (int(config.get(k, 768)) for k in ("clip_dim", "condition_dim", "sync_feat_dim"))
    la, lv, ls, lt = audio_len, visual_len, sync_len, text_len
    both = la + lv
    official = mode == "official"

    # Multiply-accumulates per sample, by part.
    embed = 256 * d + d * d + la * channels * d  # time_in, audio_embedder
    if official:
        embed += lv * (2 * clip_dim * d + d * d)  # visual_proj (SwiGLU)
        embed += lt * (cond_dim * d + d * d)  # cond_in
        embed += ls * (sync_dim * d + sync_k * 3 * d * sync_hidden)  # sync_in
    attention = modulation = triple = 0
    for i in range(n_triple):
        last = i == n_triple - 1
        mod = 2 * 9 * d * d
        if official or not last:
            proj = 14 * d * d * both  # qkv 3 + self proj 1 + cross q 1 + cross proj 1 + MLP 8, both streams
            att = 2 * both * both * d + 2 * both * lt * d
        else:
            # Both streams' qkv (visual keys/values feed the audio queries); the rest audio only.
            proj = 3 * d * d * both + 11 * d * d * la
            att = 2 * la * both * d + 2 * la * lt * d
        text_kv = 2 * d * d * lt if official else 0
        triple += mod + proj + att + text_kv
        attention += att
        modulation += mod
    mod_rows = la if official else ls
    single_mod = mod_rows * 6 * d * d
    conv_k3 = la * (3 * d * d + 9 * d * conv_hidden)  # linear1 (d->d, k=3) and ConvMLP (3 convs, k=3)
    single_att = 2 * la * la * d
    single = n_single * (single_mod + la * 3 * d * d + conv_k3 + single_att)
    attention += n_single * single_att
    modulation += n_single * single_mod
    final = la * d * channels + (la * 2 * d * d if official else 0)
    if official:
        modulation += la * 2 * d * d
    parts = {
        "embed": embed,
        "triple": triple,
        "single": single,
        "final": final,
        "attention": attention,
        "conv_k3": n_single * conv_k3,
        "modulation": modulation,
    }
    flops = {k: 2.0 * batch * v for k, v in parts.items()}
    flops["total"] = flops["embed"] + flops["triple"] + flops["single"] + flops["final"]
    return flops


# ----------------------------------------------------------------------------- the official model


def import_official(repo: Path) -> tuple[types.ModuleType, list[str]]:
    """``hunyuanvideo_foley.models.hifi_foley`` from a local checkout (never vendored into ours)."""
    notes: list[str] = []
    if not (repo / "hunyuanvideo_foley" / "models" / "hifi_foley.py").is_file():
        raise SystemExit(f"{repo} is not a HunyuanVideo-Foley checkout (no hunyuanvideo_foley/models/hifi_foley.py)")
    sys.path.insert(0, str(repo))
    for _ in range(3):
        try:
            return importlib.import_module("hunyuanvideo_foley.models.hifi_foley"), notes
        except ImportError as e:
            missing = (e.name or "").split(".")[0]
            if missing not in ("torchvision", "torchaudio"):
                raise SystemExit(
                    f"cannot import the official model from {repo}: {e}. It needs a few small packages: "
                    "pip install diffusers einops (never another torch, torchvision or torchaudio)"
                ) from None
            _stub_module(missing)
            notes.append(f"{missing} is imported by the official package but not installed: a stub module stood in for it")
    raise SystemExit(f"cannot import the official model from {repo}")


def _stub_module(name: str) -> None:
    # A module whose every attribute is a placeholder that fails when used, on sys.path for this
    # process only: the DiT itself never calls into it.
    folder = Path(tempfile.mkdtemp(prefix="foleyserve-stub-"))
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(
        "def __getattr__(attr):\n"
        "    def unavailable(*_a, **_k):\n"
        f"        raise RuntimeError('{name} is a stub in this benchmark')\n"
        "    return unavailable\n"
    )
    sys.path.insert(0, str(folder))


def build_official(module: types.ModuleType, config: Mapping[str, Any], ours: torch.nn.Module) -> torch.nn.Module:
    """The official class from ``config`` holding OUR tensors (shared storage, nothing copied)."""
    cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(model_kwargs=dict(config)))
    dtype = next(ours.parameters()).dtype
    with torch.device("meta"):
        official = module.HunyuanVideoFoley(cfg, dtype=dtype, device=torch.device("meta"))
    official.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return official.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def make_inputs(config: Mapping[str, Any], lengths: dict[str, int], text_len: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = 2
    x = {
        "x": torch.randn(b, int(config.get("audio_vae_latent_dim", 128)), lengths["audio_len"], generator=g),
        "clip_feat": torch.randn(b, lengths["visual_len"], int(config.get("clip_dim", 768)), generator=g),
        "sync_feat": torch.randn(b, lengths["sync_len"], int(config.get("sync_feat_dim", 768)), generator=g),
        "cond": torch.randn(b, text_len, int(config.get("condition_dim", 768)), generator=g),
        # Both rows of a CFG pair share the step's time.
        "t": torch.full((b,), 500.0),
    }
    return {k: v.to(device) for k, v in x.items()}


def autocast_for(dtype: torch.dtype | None, device: torch.device):
    import contextlib

    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_ours(size: str, precision: str, device: torch.device, seed: int) -> torch.nn.Module:
    """Our DiT built directly in the dtype ``precision`` computes in (the policy is applied later)."""
    from foleyserve.pipeline.random_models import random_dit

    storage = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
    return random_dit(size, device=device, dtype=storage, seed=seed)


def apply_policy_or_reason(dit: torch.nn.Module, precision: str) -> tuple[str | None, str]:
    """(reason it cannot run or None, note on what the policy kept in fp32).

    Applied for fp32 too: every policy puts the model in the inference layout the engine runs."""
    try:
        from foleyserve.precision import apply_policy
    except ImportError as e:
        return f"foleyserve.precision not importable ({e})", ""
    try:
        report = apply_policy(dit, precision)
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as e:
        return (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__), ""
    kept = getattr(report, "kept_fp32", None) or []
    return None, (f"ours keeps {', '.join(kept)} in fp32 (policy default)" if kept else "")


def _step_operands(inputs: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x, t, dsigma, scales) of one CFG step as the sampler passes them: batch-1 latents (the
    step duplicates them into the CFG pair), 0-d float32 timestep and sigma delta, [1, 1, 1] scales."""
    x = inputs["x"][:1].contiguous()
    t = inputs["t"][0].clone()
    dsigma = torch.tensor(-1.0 / 50, device=device)
    scales = torch.full((1, 1, 1), 4.5, device=device)
    return x, t, dsigma, scales


def euler_step_eager(ours: torch.nn.Module, conditions: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    from foleyserve.pipeline.sampler import euler_cfg_step

    x, t, dsigma, scales = _step_operands(inputs, x_device(inputs))
    return euler_cfg_step(ours.predict_flow, x, t, dsigma, conditions, scales, True)


def x_device(inputs: Mapping[str, torch.Tensor]) -> torch.device:
    return inputs["x"].device


def prepare_compiled(
    ours: torch.nn.Module, conditions: Any, inputs: Mapping[str, torch.Tensor], row: dict[str, Any],
    device: torch.device, *, log: Callable[[str], None],
) -> Callable[[], torch.Tensor] | None:
    """The compiled step (StepGraphs) bound to this row's conditions, compiled by its first call.

    Records the first call's wall time (compile + one step), what dynamo compiled and its graph
    breaks in ``row``; returns None (with ``compiled_unavailable`` in ``row``) when it fails."""
    from foleyserve.pipeline.stepgraph import StepGraphs, compile_counters

    x, t, dsigma, scales = _step_operands(inputs, device)
    runner = StepGraphs()
    try:
        runner.begin(ours, conditions, scales, True, None)
        log("compiling the step (StepGraphs, Inductor) ...")
        with compile_counters() as counts:
            first, _ = timed(lambda: runner.step(x, t, dsigma), device)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result to report, not a crash
        row["compiled_unavailable"] = f"failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        log(f"compiled: {row['compiled_unavailable']}")
        return None
    row["compiled_first_call_s"] = first
    row["compiled_graphs"] = counts["graphs"]
    row["compiled_graph_breaks"] = counts["graph_breaks"]
    row["compiled_buckets"] = runner.stats.compiled_buckets
    row["compiled_cuda_graph_captures"] = runner.stats.captures
    log(f"compiled: first call {first:.1f} s (compile + one step), {counts['graphs']} graph(s), {counts['graph_breaks']} graph break(s)")
    return lambda: runner.step(x, t, dsigma)


def _fingerprint(module: torch.nn.Module) -> float:
    p = next(module.parameters())
    return float(p.detach().float().sum())


def bench_size(
    size: str,
    *,
    seconds_list: list[float],
    precisions: list[str],
    text_len: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    official_module: types.ModuleType | None,
    log: Callable[[str], None],
    compiled: bool = False,
) -> list[dict[str, Any]]:
    from foleyserve.fidelity_measures import max_abs, rel_l2
    from foleyserve.pipeline.random_models import dit_config

    config = dit_config(size)
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        start = time.perf_counter()
        ours = prepare_ours(size, precision, device, seed=0)
        log(f"{size} {precision}: built in {time.perf_counter() - start:.1f} s")
        official = None
        official_note = ""
        if official_module is not None:
            if precision in OFFICIAL_DTYPES:
                official = build_official(official_module, config, ours)
            else:
                official_note = "the official code has no fp8 path"
        before = _fingerprint(official) if official is not None else None
        reason, policy_note = apply_policy_or_reason(ours, precision)
        if official is not None and _fingerprint(official) != before:
            raise RuntimeError("applying the precision policy changed the official model's shared weights")
        compute = getattr(ours, "autocast_dtype", None)
        for seconds in seconds_list:
            lengths = clip_lengths(seconds)
            row: dict[str, Any] = {
                "size": size, "seconds": seconds, **lengths, "text_len": text_len, "precision": precision,
                "flops_official": dit_flops(config, **lengths, text_len=text_len, batch=2)["total"],
                "flops_ours": dit_flops(config, **lengths, text_len=text_len, batch=2, mode="ours")["total"],
                "repeats": repeats, "warmup": warmup, "note": "; ".join(n for n in (policy_note, official_note) if n),
            }
            rows.append(row)
            if reason is not None:
                row["unavailable"] = reason
                log(f"{size} {precision} {seconds:g} s: unavailable: {reason}")
                continue
            inputs = make_inputs(config, lengths, text_len, device)
            try:
                with torch.inference_mode():
                    with autocast_for(compute, device):
                        conditions = ours.prepare_conditions(
                            clip_feat=inputs["clip_feat"], sync_feat=inputs["sync_feat"], cond=inputs["cond"], audio_len=lengths["audio_len"]
                        )

                    def ours_step() -> torch.Tensor:
                        with autocast_for(compute, device):
                            return ours.predict_flow(inputs["x"], inputs["t"], conditions)

                    def official_forward() -> torch.Tensor:
                        with autocast_for(OFFICIAL_DTYPES.get(precision), device):
                            return official(
                                x=inputs["x"], t=inputs["t"], clip_feat=inputs["clip_feat"], cond=inputs["cond"], sync_feat=inputs["sync_feat"]
                            )["x"]

                    compiled_step = None
                    if compiled:
                        compiled_step = prepare_compiled(ours, conditions, inputs, row, device, log=lambda m: log(f"{size} {precision} {seconds:g} s: {m}"))

                    ours_times, official_times, compiled_times = [], [], []
                    out_ours = out_official = out_compiled = None
                    for i in range(warmup + repeats):
                        t_ours, out_ours = timed(ours_step, device)
                        t_comp = None
                        if compiled_step is not None:
                            t_comp, out_compiled = timed(compiled_step, device)
                        t_off = None
                        if official is not None:
                            t_off, out_official = timed(official_forward, device)
                        if i >= warmup:
                            ours_times.append(t_ours)
                            if t_comp is not None:
                                compiled_times.append(t_comp)
                            if t_off is not None:
                                official_times.append(t_off)
                        log(f"{size} {precision} {seconds:g} s: ours {t_ours:.3f} s"
                            + (f", compiled {t_comp:.3f} s" if t_comp is not None else "")
                            + (f", official {t_off:.3f} s" if t_off else "")
                            + (" (warm-up)" if i < warmup else ""))
                    if compiled_step is not None:
                        # The same step eagerly (model call + CFG + Euler), to check the compiled output.
                        with autocast_for(compute, device):
                            eager_step = euler_step_eager(ours, conditions, inputs)
                        row["compiled_vs_eager_rel_l2"] = rel_l2(out_compiled.float(), eager_step.float())
                        row["compiled_vs_eager_max_abs"] = max_abs(out_compiled.float(), eager_step.float())
            except (RuntimeError, NotImplementedError, TypeError) as e:
                row["unavailable"] = f"failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                log(f"{size} {precision} {seconds:g} s: {row['unavailable']}")
                continue
            row["ours_s"] = statistics.median(ours_times)
            row["ours_s_all"] = ours_times
            row["ours_tflops"] = row["flops_ours"] / row["ours_s"] / 1e12
            row["ours_tflops_official_count"] = row["flops_official"] / row["ours_s"] / 1e12
            if compiled_times:
                row["compiled_s"] = statistics.median(compiled_times)
                row["compiled_s_all"] = compiled_times
                row["compiled_over_eager"] = row["compiled_s"] / row["ours_s"]
                row["compile_s"] = row["compiled_first_call_s"] - row["compiled_s"]
            if official_times:
                row["official_s"] = statistics.median(official_times)
                row["official_s_all"] = official_times
                row["ratio"] = row["ours_s"] / row["official_s"]
                row["official_tflops"] = row["flops_official"] / row["official_s"] / 1e12
                row["max_abs_diff"] = max_abs(out_ours.float(), out_official.float())
                row["rel_l2"] = rel_l2(out_ours.float(), out_official.float())
                if compiled_times:
                    row["compiled_over_official"] = row["compiled_s"] / row["official_s"]
            del inputs, conditions
            compiled_step = None
        del ours, official
        if compiled:
            # Dynamo's cache holds the compiled step, and through it the model: drop it before the next one.
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = _format_main(rows)
    if any("compiled_s" in r or "compiled_unavailable" in r for r in rows):
        table += "\n\n" + format_compiled(rows)
    return table


def format_compiled(rows: list[dict[str, Any]]) -> str:
    """The compiled column beside eager ours and the official module (same run, interleaved)."""
    lines = [
        "| size | clip s | precision | ours eager s/step | ours compiled s/step | official s/forward | compiled / eager | compiled / official | eager / official | first compiled call s (compile + 1 step) | graphs / breaks | compiled vs eager rel_l2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['size']} | {r['seconds']:g} | {r['precision']} |"
        if "unavailable" in r:
            lines.append(f"{head} unavailable: {r['unavailable']} | | | | | | | | |")
            continue
        if "compiled_s" not in r:
            lines.append(f"{head} {r['ours_s']:.4f} | {r.get('compiled_unavailable', '-')} | | | | | | | |")
            continue
        off = f"{r['official_s']:.4f}" if "official_s" in r else "-"
        c_off = f"**{r['compiled_over_official']:.3f}**" if "compiled_over_official" in r else "-"
        e_off = f"{r['ratio']:.3f}" if "ratio" in r else "-"
        rel = f"{r['compiled_vs_eager_rel_l2']:.2e}" if "compiled_vs_eager_rel_l2" in r else "-"
        lines.append(
            f"{head} {r['ours_s']:.4f} | {r['compiled_s']:.4f} | {off} | **{r['compiled_over_eager']:.3f}** | {c_off} | {e_off} | "
            f"{r['compiled_first_call_s']:.1f} | {r['compiled_graphs']} / {r['compiled_graph_breaks']} | {rel} |"
        )
    return "\n".join(lines)


def _format_main(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | clip s | La / Lv / Ls / Lt | precision | ours s/step (median) | official s/forward | ours / official | max abs diff | rel_l2 | GFLOP per call (official count) | ours TFLOP/s (official count) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['size']} | {r['seconds']:g} | {r['audio_len']} / {r['visual_len']} / {r['sync_len']} / {r['text_len']} | {r['precision']} |"
        if "unavailable" in r:
            lines.append(f"{head} unavailable: {r['unavailable']} | | | | | {r['flops_official'] / 1e9:,.1f} | | {r['note']} |")
            continue
        off = f"{r['official_s']:.4f}" if "official_s" in r else "-"
        ratio = f"**{r['ratio']:.3f}**" if "ratio" in r else "-"
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        rel = f"{r['rel_l2']:.2e}" if "rel_l2" in r else "-"
        lines.append(
            f"{head} {r['ours_s']:.4f} | {off} | {ratio} | {diff} | {rel} | {r['flops_official'] / 1e9:,.1f} | "
            f"{r['ours_tflops_official_count']:.3f} | {r['note']} |"
        )
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,xl", help="comma-separated: tiny, xl, xxl (default tiny,xl)")
    ap.add_argument("--seconds", default="8,10", help="clip lengths in seconds (default 8,10)")
    ap.add_argument("--precisions", default=",".join(POLICIES), help="policies to time (default: all)")
    ap.add_argument("--text-tokens", type=int, default=20, help="CLAP tokens per prompt (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--reference-repo", type=Path, help="local checkout of Tencent-Hunyuan/HunyuanVideo-Foley to time side by side")
    ap.add_argument("--json", type=Path, help="also write the rows and machine details as JSON")
    ap.add_argument("--compiled", action="store_true",
                    help="also time ours through the compiled step runner (StepGraphs), interleaved; compile time reported apart")
    args = ap.parse_args(argv)

    from foleyserve.commands.profile import describe_machine, machine_info
    from foleyserve.pipeline.random_models import MODEL_SIZES

    sizes = _csv(args.sizes)
    precisions = _csv(args.precisions)
    bad = [s for s in sizes if s not in MODEL_SIZES] + [p for p in precisions if p not in POLICIES]
    if bad:
        ap.error(f"unknown size or precision: {', '.join(bad)} (sizes {', '.join(MODEL_SIZES)}; precisions {', '.join(POLICIES)})")
    try:
        seconds_list = [float(s) for s in _csv(args.seconds)]
        for s in seconds_list:
            clip_lengths(s)
    except ValueError as e:
        ap.error(f"--seconds: {e}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no usable CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(f"dit_step: {line}", file=sys.stderr, flush=True)

    official_module, notes = (None, [])
    if args.reference_repo is not None:
        official_module, notes = import_official(args.reference_repo)
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rows += bench_size(size, seconds_list=seconds_list, precisions=precisions, text_len=args.text_tokens,
                           repeats=args.repeats, warmup=args.warmup, device=device, official_module=official_module, log=log,
                           compiled=args.compiled)
    machine_after = machine_info()
    print(f"# DiT per step, batch 2 (one CFG pair), {device}; median of {args.repeats} after {args.warmup} warm-up; "
          f"runs of ours{' (eager, compiled)' if args.compiled else ''} and the official model interleaved")
    print(f"# {describe_machine(machine)}; load average at the end {machine_after.get('load_average')}")
    if args.reference_repo is not None:
        print(f"# official: {args.reference_repo} (hunyuanvideo_foley.models.hifi_foley), given our random state dict")
    for n in notes:
        print(f"# note: {n}")
    print()
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps({"tool": "bench/dit_step.py", "argv": sys.argv[1:], "machine": machine,
                                         "machine_after": machine_after, "notes": notes, "rows": rows}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
