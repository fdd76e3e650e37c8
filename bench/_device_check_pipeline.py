"""The DiT and pipeline phases of ``bench/device_check.py``: DiT correctness, step times, end to
end, offload, peak VRAM and the compile child (helpers and the first phases: ``_device_check_phases``).

Each phase function takes the check's context ``ctx`` and a results dict ``sec`` that is already part
of the JSON; ``ctx.item`` records one measurement with its own error capture and saves the file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import _device_check_phases as P
from _device_check_phases import autocast_of, capture_graph, dit_inputs, first_line, free, kernel_breakdown, make_dit
from _device_check_phases import official_step, rel, run_ours, set_tf32, sync, timeit, write_json

REPO = Path(__file__).resolve().parents[1]
ARTIFACT_LIMIT = 15 * 2**20  # what may come back from the device machine next to the JSON


# ----------------------------------------------------------------------------- phase 3: DiT correctness


def phase_dit_correctness(ctx, sec: dict) -> None:
    """A few blocks at XXL width and clip shapes, on this device in every mode, against fp32 on the CPU."""
    from foleyserve.models.dit import DiTConfig
    from foleyserve.precision import apply_policy

    plan, dev = ctx.plan, ctx.device
    cuda = dev.type == "cuda"
    kwargs = plan.correctness
    cfg = DiTConfig.from_model_kwargs(kwargs)
    base = make_dit(kwargs, "cpu", torch.float32, seed=1)  # checkpoint layout (unfused), for the official too
    cpu_in = dit_inputs(cfg, plan.seconds, plan.text_len, plan.batch, "cpu")
    dev_in = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in cpu_in.items()}
    sec["config"] = {k: kwargs[k] for k in ("hidden_size", "num_heads", "depth_triple_blocks", "depth_single_blocks")}
    sec["lengths"] = cpu_in["lengths"]
    ref_model = copy.deepcopy(base)
    apply_policy(ref_model, "fp32")
    ref = run_ours(ref_model, cpu_in)
    del ref_model
    outputs: dict[str, torch.Tensor] = {}

    def mode(label: str, policy: str, tf32: bool | None, **policy_kw):
        if tf32 and not cuda:
            return "skipped: no cuda"
        m = copy.deepcopy(base).to(dev)
        apply_policy(m, policy, **policy_kw)
        if cuda:
            set_tf32(bool(tf32))
        try:
            y = run_ours(m, dev_in)
        finally:
            if cuda:
                set_tf32(False)
        outputs[label] = y
        return {"rel_l2_vs_cpu_fp32": rel(y, ref), "max_abs": float((y.cpu() - ref).abs().max()),
                "finite": bool(torch.isfinite(y).all())}

    ctx.item(sec, "fp32_tf32_off", lambda: mode("fp32_tf32_off", "fp32", False))
    ctx.item(sec, "fp32_tf32_on", lambda: mode("fp32_tf32_on", "fp32", True))
    for policy in ("bf16", "fp8", "fp8-weight-only"):
        ctx.item(sec, policy, lambda p=policy: mode(p, p, None))
    # keep_fp32=[]: every layer in bf16, as the official code runs it (the fair one to compare).
    ctx.item(sec, "bf16_official_numerics", lambda: mode("bf16_official_numerics", "bf16", None, keep_fp32=[]))
    if ctx.get_official() is None:
        sec["official"] = ctx.official_note
        return
    ctx.item(sec, "official", lambda: _official_correctness(ctx, base, dev_in, ref, outputs))


def _official_correctness(ctx, base, dev_in: dict, ref: torch.Tensor, outputs: dict) -> dict[str, Any]:
    from dit_step import build_official

    dev = ctx.device
    out: dict[str, Any] = {}
    inp = (dev_in["x"], dev_in["t"], dev_in["clip_feat"], dev_in["sync_feat"], dev_in["cond"])
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base).to(dev, dtype)
        official = build_official(ctx.official, ctx.plan.correctness, model)
        if dev.type == "cuda":
            set_tf32(False)
        y = official_step(official, *inp, dtype=dtype)
        row = {"rel_l2_vs_cpu_fp32": rel(y, ref), "finite": bool(torch.isfinite(y).all())}
        ours = outputs.get("fp32_tf32_off" if name == "fp32" else "bf16")
        if ours is not None:
            row["ours_rel_l2_vs_official"] = rel(ours, y)
        if name == "bf16" and "bf16_official_numerics" in outputs:
            row["ours_all_bf16_rel_l2_vs_official"] = rel(outputs["bf16_official_numerics"], y)
        out[name] = row
        del model, official
    return out


# ----------------------------------------------------------------------------- phase 4: step times


def phase_step_times(ctx, sec: dict) -> None:
    """Per configuration: the eager step, its kernels, the same step from one CUDA graph, the
    official step (XXL bf16), and one sampling loop under CUDA's sync-debug mode."""
    plan = ctx.plan
    for size in plan.sizes:
        for precision in plan.precisions:
            key = f"{size}/{precision}"
            if ctx.left() < (8 if plan.smoke else 20):
                sec[key] = "skipped: budget"
                continue
            ctx.item(sec, key, lambda s=size, p=precision, k=key: _step_config(ctx, sec, k, s, p))
            free(ctx.device)


def _step_config(ctx, sec: dict, key: str, size: str, precision: str) -> None:
    from dit_step import build_official, dit_flops

    from foleyserve.pipeline.random_models import dit_config, random_dit
    from foleyserve.pipeline.sampler import cfg_inputs, euler_cfg_step
    from foleyserve.precision import apply_policy

    plan, dev = ctx.plan, ctx.device
    cuda = dev.type == "cuda"
    row = sec[key] = {}
    dit = random_dit(size, device=dev, dtype=torch.bfloat16, seed=0)
    official = None
    first = size == plan.sizes[0] and precision == "bf16"
    if first and ctx.get_official() is not None:
        official = build_official(ctx.official, dit_config(size), dit)  # shares the weights, before the policy
    apply_policy(dit, precision)
    one = dit_inputs(dit.config, plan.seconds, plan.text_len, 1, dev)
    uncond = torch.randn_like(one["cond"])
    n = one["lengths"]
    clip2, sync2, text2 = cfg_inputs(dit, clip_feat=one["clip_feat"], sync_feat=one["sync_feat"], text_feat=one["cond"],
                                     uncond_text_feat=uncond, batch=1, guidance=True)
    with torch.no_grad(), autocast_of(dit):
        conditions = dit.prepare_conditions(clip_feat=clip2, sync_feat=sync2, cond=text2, audio_len=n["audio_len"])
    x = one["x"].float()
    t = torch.tensor(500.0, device=dev)
    dsigma = torch.tensor(-1.0 / plan.steps, device=dev)
    scales = torch.full((1, 1, 1), 4.5, device=dev)

    def step() -> torch.Tensor:
        with torch.no_grad(), autocast_of(dit):
            return euler_cfg_step(dit.predict_flow, x, t, dsigma, conditions, scales, True)

    flops = dit_flops(dit_config(size), audio_len=n["audio_len"], visual_len=n["visual_len"], sync_len=n["sync_len"],
                      text_len=n["text_len"], batch=2)["total"]
    row.update({"lengths": n, "batch": 2, "flops_per_step_official_count": flops})
    if official is not None:
        row["note"] = "memory figures include the official module's own (unfused) copies of the k=3 conv weights"

    def rates(ms: float) -> dict[str, float]:
        tflops = flops / (ms * 1e-3) / 1e12
        return {"dit_s_per_clip": ms * plan.steps / 1e3, "tflops": tflops, "mfu": tflops / ctx.peak_tflops}

    eager_out = step()

    def eager() -> dict[str, Any]:
        resident = torch.cuda.memory_allocated(dev) if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        r = timeit(step, dev, plan.warmup, plan.iters)
        return {**r, **rates(r["median_ms"]), "resident_bytes": resident,
                "peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None}

    ctx.item(row, "eager", eager)
    # The graph before the profiler: the first (most valuable) capture then never follows CUPTI.
    if cuda:
        ctx.item(row, "cuda_graph", lambda: _graph_step(ctx, step, eager_out, rates))
    else:
        row["cuda_graph"] = "skipped: no cuda"
    ctx.item(row, "kernels", lambda: kernel_breakdown(step, dev))
    if official is not None:
        ctx.item(row, "official", lambda: _official_step(ctx, official, dit, conditions, x, t, clip2, sync2, text2, row, rates))
    elif first:
        row["official"] = ctx.official_note or "skipped: no --reference-repo"
    if first:
        ctx.item(row, "sync_debug_loop", lambda: _sync_check(ctx, dit, one, uncond))


def _graph_step(ctx, step, eager_out: torch.Tensor, rates) -> dict[str, Any]:
    # The eager step replayed from one CUDA graph: what is left once launch overhead is gone.
    dev = ctx.device
    graph, out = capture_graph(step, dev)
    graph.replay()
    torch.cuda.synchronize(dev)
    r = timeit(graph.replay, dev, ctx.plan.warmup, ctx.plan.iters)
    res = {**r, **rates(r["median_ms"]), "rel_l2_vs_eager": rel(out, eager_out)}
    del graph
    return res


def _official_step(ctx, official, dit, conditions, x, t, clip2, sync2, text2, row, rates) -> dict[str, Any]:
    # The official loop calls the whole forward every step (conditions included), at batch 2.
    dev, plan = ctx.device, ctx.plan
    x2, t2 = torch.cat((x, x)), t.expand(2)
    fn = lambda: official_step(official, x2, t2, clip2, sync2, text2, torch.bfloat16)  # noqa: E731
    y_off = fn()
    with torch.no_grad(), autocast_of(dit):
        y_ours = dit.predict_flow(x2, t2, conditions).float()
    r = timeit(fn, dev, plan.warmup, plan.iters)
    out = {**r, **rates(r["median_ms"]), "ours_velocity_rel_l2_vs_official": rel(y_ours, y_off)}
    for mine in ("eager", "cuda_graph"):
        if isinstance(row.get(mine), dict) and "median_ms" in row[mine]:
            out[f"ours_{mine}_over_official"] = row[mine]["median_ms"] / r["median_ms"]
    return out


def _sync_check(ctx, dit, one: dict, uncond: torch.Tensor) -> dict[str, Any]:
    """One sampling loop (eager, no step cache) that must make no host sync.

    The sampler's set-up copies the schedule and RoPE tables to the device, which sync-debug mode
    counts as syncs, so it runs in "warn" mode (counted); a pass-through runner switches to "error"
    for the loop itself, where each step is the same ``euler_cfg_step`` the runner-less loop runs.
    """
    import warnings

    from foleyserve.pipeline.sampler import euler_cfg_step, initial_noise, sample_latents

    dev, plan = ctx.device, ctx.plan
    cuda = dev.type == "cuda"

    class EagerRunner:
        def begin(self, dit_, conditions, scales, guidance, step_cache) -> None:
            self.args = (conditions, scales, guidance)
            if cuda:
                torch.cuda.set_sync_debug_mode("error")

        def step(self, x, t, dsigma):
            with autocast_of(dit):
                return euler_cfg_step(dit.predict_flow, x, t, dsigma, *self.args)

    noise = initial_noise(1, one["x"].shape[-1], seed=0, device=dev)
    raised = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        try:
            lat = sample_latents(dit, noise=noise, clip_feat=one["clip_feat"], sync_feat=one["sync_feat"],
                                 text_feat=one["cond"], uncond_text_feat=uncond, steps=plan.steps, runner=EagerRunner())
        except RuntimeError as e:
            raised, lat = first_line(e), None
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        sync(dev)  # after the mode is off: this wait is ours, not the loop's
        wall = time.perf_counter() - start
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    return {
        "steps": plan.steps,
        "checked": cuda or "skipped: no cuda (the loop ran without the check)",
        "loop_raised": raised is not None,
        "error": raised,
        "setup_sync_warnings": len(syncs),
        "setup_sync_examples": syncs[:3],
        "wall_s_eager_loop": wall,
        "finite": None if lat is None else bool(torch.isfinite(lat).all()),
    }


# ----------------------------------------------------------------------------- phase 5: end to end


def _engine(ctx, precision: str, offload: str = "none"):
    """An engine over the shared encoders and DAC with a fresh random DiT (the policy converts it
    in place). The cached components hold no DiT: an idle one would count in every device peak."""
    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.random_models import random_components, random_dit

    size = ctx.plan.e2e_size
    dit = random_dit(size, device=ctx.device, dtype=torch.bfloat16, seed=0)
    shared = ctx.cache.get("components")
    if shared is None:
        shared = random_components(size, device=ctx.device, dtype=torch.bfloat16, seed=0, dit=dit,
                                   log=lambda line: ctx.log("  " + line))
        ctx.cache["components"] = replace(shared, dit=None)
    engine = Engine(components=replace(shared, dit=dit), precision=precision)
    # model= is only validated (the weights are built already); tiny passes as xxl.
    return engine.configure(EngineConfig(demo=True, model="xxl" if size == "tiny" else size, precision=precision,
                                         device=str(ctx.device), offload=offload))


def _generate(ctx, engine, steps: int) -> dict[str, Any]:
    from foleyserve.pipeline.requests import GenerationRequest

    prompt, dev, av = "a ball bouncing on a wooden floor", ctx.device, ctx.cache["av"]
    result = None
    if av["available"]:
        from foleyserve.media import MediaError

        try:
            tmp = Path(ctx.cache.setdefault("tmp", tempfile.mkdtemp(prefix="device-check-")))
            clip = ctx.cache.get("clip") or ctx.cache.setdefault("clip", P.make_clip(tmp / "clip.mp4", ctx.plan.seconds))
            sync(dev)
            start = time.perf_counter()
            result = engine.generate(GenerationRequest(video=clip, prompt=prompt, steps=steps, output=tmp / "out.mp4"))
        except Exception as e:
            # A PyAV/FFmpeg problem (decode, encode, mux) must not cost the timings: go synthetic.
            # Anything else (the models) is the phase's error.
            if not (isinstance(e, MediaError) or type(e).__module__.split(".")[0] == "av" or "PyAV" in str(e)):
                raise
            av.update(available=False, error=first_line(e))
            ctx.log(f"  PyAV path failed ({av['error']}); synthetic frames from now on")
    if result is None:
        job_request = GenerationRequest(video="synthetic", prompt=prompt, steps=steps)
        decoded = P.synthetic_decoded(ctx.plan.seconds)
        sync(dev)
        start = time.perf_counter()
        job = engine.prepare(job_request, decoded=decoded)
        result = engine.finish(job, engine.sample_jobs([job])[0])
    sync(dev)
    wall = time.perf_counter() - start
    stages = {k: {"seconds": v["seconds"], "device_peak_bytes": v.get("device_peak_bytes")}
              for k, v in result.memory.items() if k != "overall"}
    peaks = [s["device_peak_bytes"] for s in stages.values() if s["device_peak_bytes"] is not None]
    dit_s = stages.get("dit", {}).get("seconds")
    return {"steps": steps, "wall_s": wall, "stages_s": sum(s["seconds"] for s in stages.values()), "dit_s": dit_s,
            "dit_step_ms": dit_s * 1e3 / steps if dit_s else None, "stages": stages,
            "device_peak_bytes": max(peaks) if peaks else None,
            "device_resident_after_bytes": torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None}


def phase_end_to_end(ctx, sec: dict) -> None:
    sec["input"] = ("a PyAV-encoded clip: decode and mux included" if ctx.cache["av"]["available"] else
                    "synthetic frames: no PyAV here, so decode and mux are not run (no 'decode'/'write' stage)")
    sec["pyav"] = ctx.cache["av"]  # the same dict: says so if the PyAV path failed and the run went synthetic
    sec["size"], sec["seconds"] = ctx.plan.e2e_size, ctx.plan.seconds

    def run(precision: str) -> dict[str, Any]:
        engine = _engine(ctx, precision)
        # The first generation pays cuDNN/cuBLAS set-up and lazy inits: run one, uncounted.
        warm = _generate(ctx, engine, steps=2) if ctx.plan.warm_runs else None
        out = _generate(ctx, engine, steps=ctx.plan.steps)
        out["warm_up_wall_s"] = warm["wall_s"] if warm else None
        del engine
        free(ctx.device)
        return out

    for precision in ("bf16", "fp8"):
        ctx.item(sec, precision, lambda p=precision: run(p))


# ----------------------------------------------------------------------------- phase 6: offload


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def phase_offload(ctx, sec: dict) -> None:
    """Stage and sequential offload against the resident DiT: same latents, time, peaks, host memory."""
    from foleyserve.pipeline.offload import apply_offload
    from foleyserve.pipeline.random_models import random_dit
    from foleyserve.pipeline.sampler import initial_noise, sample_latents
    from foleyserve.precision import apply_policy

    plan, dev = ctx.plan, ctx.device
    cuda = dev.type == "cuda"
    size = plan.e2e_size
    feats: dict[str, Any] = {}

    def build():
        dit = random_dit(size, device=dev, dtype=torch.bfloat16, seed=0)
        apply_policy(dit, "bf16")
        if not feats:
            feats.update(dit_inputs(dit.config, plan.seconds, plan.text_len, 1, dev))
            feats["uncond"] = torch.randn_like(feats["cond"])
        return dit

    def run(dit, rows: int, lender=None) -> tuple[torch.Tensor, dict[str, Any]]:
        noise = torch.cat([initial_noise(1, feats["x"].shape[-1], seed=i) for i in range(rows // 2)]).to(dev)
        hold = lender.on_device(dit) if lender is not None else contextlib.nullcontext()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        start = time.perf_counter()
        with hold:
            lat = sample_latents(dit, noise=noise, clip_feat=feats["clip_feat"], sync_feat=feats["sync_feat"],
                                 text_feat=feats["cond"], uncond_text_feat=feats["uncond"], steps=plan.offload_steps)
        sync(dev)
        took = time.perf_counter() - start
        return lat, {"rows": rows, "requests": rows // 2, "steps": plan.offload_steps, "step_s": took / plan.offload_steps,
                     "device_peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None}

    sec["note"] = ("rows are model rows (a request with CFG is 2); latents compared bit for bit with the resident run; "
                   "step_s is a whole sample_latents call over its steps, weight copies included (stage: once per call, "
                   "sequential: every block every step)")
    resident: dict[int, torch.Tensor] = {}

    def resident_runs() -> dict[str, Any]:
        dit, out = build(), {}
        for rows in plan.offload_rows:
            resident[rows], out[f"rows={rows}"] = run(dit, rows)
        del dit
        free(dev)
        return out

    ctx.item(sec, "resident", resident_runs)

    def offloaded(mode: str) -> dict[str, Any]:
        dit = build()
        rss0, start = _rss(), time.perf_counter()
        lender = apply_offload(mode, dev, {"dit": dit}, dit=dit)
        slabs = [c.slab for c in getattr(lender, "_copies", {}).values()] + list(getattr(lender, "streamers", []))
        out: dict[str, Any] = sec.setdefault(mode, {})
        out.update({"setup_s": time.perf_counter() - start, "host_weight_bytes": lender.host_bytes,
                    "weight_tensor_bytes": getattr(lender, "tensor_bytes", None),
                    "pinned": [bool(getattr(getattr(s, "slab", s), "pinned", False)) for s in slabs if s is not None],
                    "host_rss_bytes": _rss(), "host_rss_growth_bytes": (_rss() or 0) - (rss0 or 0),
                    "device_resident_bytes": torch.cuda.memory_allocated(dev) if cuda else None})
        for rows in plan.offload_rows:
            lat, r = run(dit, rows, lender)
            ref = resident.get(rows)
            if ref is not None:
                r.update({"bit_equal": torch.equal(lat, ref), "max_abs": float((lat - ref).abs().max()),
                          "rel_l2": rel(lat, ref)})
            out[f"rows={rows}"] = r
            ctx.save()
        for s in getattr(lender, "streamers", []):
            s.remove()
        del dit, lender
        free(dev)
        return out

    for mode in ("stage", "sequential"):
        ctx.item(sec, mode, lambda m=mode: offloaded(m))


# ----------------------------------------------------------------------------- phase 7: peak VRAM


def phase_peak_vram(ctx, sec: dict) -> None:
    e2e = ctx.results["phases"].get("end_to_end", {}).get("results", {})
    for precision in ("bf16", "fp8"):
        r = e2e.get(precision)
        sec[precision] = ({"device_peak_bytes": r["device_peak_bytes"], "source": "end_to_end (max over stages)"}
                          if isinstance(r, dict) and "device_peak_bytes" in r else "not measured: end_to_end has no result")

    def sequential() -> dict[str, Any]:
        engine = _engine(ctx, "bf16", offload="sequential")
        resident = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
        if ctx.plan.warm_runs:
            _generate(ctx, engine, steps=1)
        out = _generate(ctx, engine, steps=ctx.plan.peak_steps)
        out.update({"source": "a sequential-offload generation (max over stages)", "resident_after_configure_bytes": resident,
                    "host_rss_bytes": _rss(), "host_weight_bytes": getattr(engine._lender, "host_bytes", None)})
        return out

    ctx.item(sec, "sequential_offload", sequential)


# ----------------------------------------------------------------------------- phase 8: compile


def phase_compile(ctx, sec: dict) -> None:
    """The compile runs in a child with its own hard timeout: a compile that never ends must not eat
    the budget, and the child's partial JSON survives the kill."""
    child_json = ctx.out.with_name(ctx.out.stem + "_compile.json")
    artifacts = ctx.out.with_name(ctx.out.stem + "_compile_artifacts.bin")
    timeout = min(ctx.args.compile_timeout_s, ctx.left() - 5)
    sec.update({"timeout_s": round(timeout, 1), "backend": ctx.args.compile_backend})
    cmd = [sys.executable, str(REPO / "bench" / "device_check.py"), "--compile-child", "--out", str(child_json),
           "--artifacts", str(artifacts), "--device", str(ctx.device), "--peak-tflops", str(ctx.peak_tflops),
           "--compile-backend", ctx.args.compile_backend] + (["--smoke"] if ctx.plan.smoke else [])
    if ctx.args.load_artifacts:
        cmd += ["--load-artifacts", str(ctx.args.load_artifacts)]
    child_json.unlink(missing_ok=True)
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            sec["returncode"] = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            sec["returncode"] = f"killed: timeout after {timeout:.0f} s"
        finally:
            if proc.poll() is None:  # timeout, or the budget alarm fired while waiting
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: Inductor's compile workers too
                proc.wait()
            log.seek(0)
            sec["log_tail"] = log.read()[-2500:].splitlines()
            if child_json.is_file():
                sec["child"] = json.loads(child_json.read_text())
                child_json.unlink()
    if sec["returncode"] != 0:
        raise RuntimeError(f"compile child: {sec['returncode']} (partial results in 'child')")


def compile_child(args: argparse.Namespace) -> int:
    """XXL bf16, 10 s clip, one request with CFG: StepGraphs' compiled (and on CUDA captured) step."""
    from dit_step import dit_flops

    from foleyserve.pipeline.random_models import dit_config, random_dit
    from foleyserve.pipeline.sampler import sample_latents
    from foleyserve.pipeline.stepgraph import StepGraphs, compile_counters, load_compile_artifacts, save_compile_artifacts
    from foleyserve.precision import apply_policy

    plan, dev = P.make_plan(args.smoke), torch.device(args.device)
    size = plan.sizes[0]
    res: dict[str, Any] = {"size": size, "precision": "bf16", "backend": args.compile_backend, "seconds": plan.seconds}
    def save(progress: str) -> None:  # a timeout kill leaves this file saying how far it got
        res["progress"] = progress
        write_json(args.out, res)

    save("building the model")
    if args.load_artifacts:
        res["artifacts_loaded"] = load_compile_artifacts(args.load_artifacts)
    dit = random_dit(size, device=dev, dtype=torch.bfloat16, seed=0)
    apply_policy(dit, "bf16")
    inp = dit_inputs(dit.config, plan.seconds, plan.text_len, 1, dev)
    kw = dict(noise=inp["x"], clip_feat=inp["clip_feat"], sync_feat=inp["sync_feat"], text_feat=inp["cond"],
              uncond_text_feat=torch.randn_like(inp["cond"]), guidance_scale=4.5)
    check_steps = 3 if not plan.smoke else 2
    save("eager reference loop")
    eager = sample_latents(dit, steps=check_steps, **kw)
    runner = StepGraphs(compile_options={} if args.compile_backend == "inductor" else {"backend": args.compile_backend})
    save("compiling (first call: compile, capture, one replay)")
    sync(dev)
    start = time.perf_counter()
    with compile_counters() as counted:
        sample_latents(dit, steps=1, runner=runner, **kw)
        sync(dev)
    res["first_call_s"] = time.perf_counter() - start
    res.update(counted)
    save("timing the compiled step")
    marks: list[Any] = []

    def mark(_i, _n, _x) -> None:  # one event per step: no host sync inside the loop
        if dev.type == "cuda":
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    sample_latents(dit, steps=plan.compile_steps, runner=runner, callback=mark, **kw)
    sync(dev)
    gaps = [(a.elapsed_time(b) if dev.type == "cuda" else (b - a) * 1e3) for a, b in zip(marks, marks[1:])]
    n = inp["lengths"]
    flops = dit_flops(dit_config(size), audio_len=n["audio_len"], visual_len=n["visual_len"], sync_len=n["sync_len"],
                      text_len=n["text_len"], batch=2)["total"]
    ms = sorted(gaps)[len(gaps) // 2] if gaps else float("nan")
    res.update({"captured": dev.type == "cuda", "step_ms": ms, "dit_s_per_clip": ms * plan.steps / 1e3,
                "mfu": flops / (ms * 1e-3) / 1e12 / args.peak_tflops, "steps_timed": len(gaps)})
    res["rel_l2_vs_eager"] = rel(sample_latents(dit, steps=check_steps, runner=runner, **kw), eager)
    res["stats"] = asdict(runner.stats)
    try:
        from torch._dynamo.utils import compile_times

        res["compile_times"] = str(compile_times(repr="str"))[-3000:].splitlines()
    except Exception as e:  # noqa: BLE001 - informative only
        res["compile_times"] = f"unavailable: {first_line(e)}"
    save("saving compile artifacts")
    nbytes = save_compile_artifacts(args.artifacts)
    kept = 0 < nbytes <= ARTIFACT_LIMIT
    if not kept:
        Path(args.artifacts).unlink(missing_ok=True)
    res["artifacts"] = {"bytes": nbytes, "kept": kept, "file": Path(args.artifacts).name if kept else None}
    save("done")
    return 0
