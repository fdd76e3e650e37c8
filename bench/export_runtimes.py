"""Per stage at real sizes (random weights): torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime INT8 on this CPU,
and the INT8 fidelity of whole generations with the demo model.

    python bench/export_runtimes.py --json bench/results/export_runtimes_cpu.json
    python bench/export_runtimes.py --stages dac,dit --repeats 5

Stages and sizes (issue 11): the DAC decoder for 10 s of latents (500), SigLIP2 on 80 frames
(10 s at 8 fps, in the engine's chunks of 16), Synchformer on the 30 windows of 10 s at 25 fps
(chunks of 8), CLAP text on a prompt pair, and one DiT step at 10 s with CFG (batch 2). The DiT is
XL's width, heads and token counts with 2 of its 12 triple and 4 of its 24 single blocks (a sixth
of its depth): the full XL in fp32 is 11.6 GB, and torch plus an ONNX Runtime session of it do not
fit this box's 24 GB side by side. Its step time scales with depth, so the full-step figure is x6.

Each repeat runs the three runtimes back to back (interleaved, so a busy moment hits all three);
the tables quote medians. Fidelity is each runtime's output vs torch fp32 on the same input.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("dac", "siglip", "synchformer", "clap", "dit")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def _snr(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(np.sum(b64**2) / max(np.sum((a64 - b64) ** 2), 1e-30)))


def _build(stage: str):
    """(torch module, export function, torch forward(inputs) -> np, inputs (torch), ORT feed(runtime stage) -> np)."""
    from foleyserve.export import dit_onnx, encoders_onnx, onnx_export
    from foleyserve.models.encoders import build_clap_text, build_siglip_vision
    from foleyserve.pipeline import random_models

    gen = torch.Generator().manual_seed(0)
    if stage == "dac":
        dac = random_models.random_dac()
        z = torch.randn(1, dac.latent_dim, 500, generator=gen)
        return dac, onnx_export.export_dac_decoder, lambda: dac.decode(z), lambda run: run(z=z)["audio"]
    if stage == "siglip":
        tower = build_siglip_vision(seed=0)
        frames = torch.rand(80, 3, 512, 512, generator=gen) * 2 - 1
        graph = encoders_onnx._SiglipPooledGraph(tower).eval()
        chunks = frames.split(16)
        return (tower, encoders_onnx.export_siglip_vision, lambda: torch.cat([graph(c) for c in chunks]),
                lambda run: torch.cat([run(pixel_values=c)["image_features"] for c in chunks]))
    if stage == "synchformer":
        visual = random_models.random_synchformer()
        segments = torch.randn(30, 16, 3, 224, 224, generator=gen)
        graph = encoders_onnx._SyncSegmentsGraph(visual).eval()
        chunks = segments.split(8)
        return (visual, encoders_onnx.export_synchformer, lambda: torch.cat([graph(c) for c in chunks]),
                lambda run: torch.cat([run(segments=c)["features"] for c in chunks]))
    if stage == "clap":
        clap = build_clap_text(seed=1).eval()
        ids, mask = encoders_onnx.synthetic_clap_tokens([21, 9], clap.config, gen)
        graph = encoders_onnx._ClapHiddenGraph(clap).eval()
        return clap, encoders_onnx.export_clap_text, lambda: graph(ids, mask), lambda run: run(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    if stage == "dit":
        from foleyserve.models.dit import build_dit, xl_config

        config = {**xl_config(), "depth_triple_blocks": 2, "depth_single_blocks": 4}
        dit = random_models._materialise(lambda: build_dit(config, device="meta"), "cpu", torch.float32, random_models._dit_scale, 0)
        fused = dit.fuse_for_inference(conv_layout=True)  # the engine's CPU layout for the torch side
        x, t, c = dit_onnx.example_conditions(fused, batch=2, seconds=10.0, tokens=20, seed=1)
        names = dit_onnx.condition_names(len(fused.triple_blocks))
        cond = dict(zip(names, dit_onnx.condition_tensors(c)))

        def ort_step(stages):
            first, rest, head = stages
            pick = lambda s, extra: {**{k: cond[k] for k in s.input_names if k in cond}, **extra}  # noqa: E731
            a = first(**pick(first, {"x": x, "t": t}))
            h = rest(**pick(rest, {"audio_stream": a["audio_stream"], "visual_stream": a["visual_stream"], "vec": a["vec"]}))
            return head(hidden=h["hidden"])["velocity"]

        return fused, dit_onnx.export_dit_step, lambda: fused.predict_flow(x, t, c), ort_step
    raise ValueError(stage)


def _open(folder: Path, stage: str):
    from foleyserve.export.backend import TorchStage
    from foleyserve.export.ort_runtime import StageRuntime
    from foleyserve.export.stages import GROUPS

    stages = [TorchStage(StageRuntime.load(folder, g), torch.device("cpu")) for g in GROUPS[stage]]
    return stages if stage == "dit" else stages[0]


def bench_stage(stage: str, repeats: int, work: Path, log) -> dict:
    from foleyserve.export.quantize import quantize_stages

    module, export, torch_run, ort_run = _build(stage)
    n_params = sum(p.numel() for p in module.parameters())
    fp32_dir, int8_dir = work / f"{stage}_fp32", work / f"{stage}_int8"
    t0 = time.perf_counter()
    entries = export(module, fp32_dir, source="random weights (real size)", source_hashes={})
    entries = entries if isinstance(entries, list) else [entries]
    from foleyserve.export.exporter import update_manifest

    update_manifest(fp32_dir, [type(e)(**{**e.__dict__, "extra": {**e.extra, "precision": "fp32"}}) for e in entries])
    export_s = time.perf_counter() - t0
    shutil.copytree(fp32_dir, int8_dir)
    t0 = time.perf_counter()
    # The DAC is all convolutions, which the default (MatMul/Gemm) quantiser leaves fp32; measure
    # ORT's ConvInteger path for it instead.
    quantize_stages(int8_dir, [stage], **({"ops": ["Conv", "MatMul", "Gemm"]} if stage == "dac" else {}))
    quant_s = time.perf_counter() - t0
    log(f"{stage}: {n_params / 1e6:.0f} M params, exported in {export_s:.0f} s, quantised in {quant_s:.0f} s")
    runtimes = {"torch_fp32": torch_run, "ort_fp32": lambda s=_open(fp32_dir, stage): ort_run(s),
                "ort_int8": lambda s=_open(int8_dir, stage): ort_run(s)}
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    outputs = {}
    with torch.inference_mode():
        for name, run in runtimes.items():  # warm-up (first-call allocations, ORT's lazy init)
            outputs[name] = run().float().numpy()
        for _ in range(repeats):
            for name, run in runtimes.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    ref = outputs["torch_fp32"]
    result = {
        "params_m": round(n_params / 1e6, 1), "export_s": round(export_s, 1), "quantize_s": round(quant_s, 1),
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "runs_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "rel_l2_vs_torch": {k: _rel(outputs[k], ref) for k in ("ort_fp32", "ort_int8")},
        "snr_db_vs_torch": {k: round(_snr(outputs[k], ref), 2) for k in ("ort_fp32", "ort_int8")},
        "graph_mb": {d.name.split("_")[-1]: round(sum(f.stat().st_size for f in d.iterdir()) / 1e6, 1) for d in (fp32_dir, int8_dir)},
    }
    if stage == "dac":
        from foleyserve.fidelity_measures import log_mel_distance

        result["log_mel_vs_torch"] = {k: round(float(log_mel_distance(torch.from_numpy(outputs[k][0]), torch.from_numpy(ref[0]))), 4)
                                      for k in ("ort_fp32", "ort_int8")}
    m = result["median_s"]
    log(f"{stage}: torch {m['torch_fp32']:.3f} s, ORT fp32 {m['ort_fp32']:.3f} s, ORT int8 {m['ort_int8']:.3f} s; "
        f"rel-L2 fp32 {result['rel_l2_vs_torch']['ort_fp32']:.1e}, int8 {result['rel_l2_vs_torch']['ort_int8']:.1e}")
    shutil.rmtree(fp32_dir)
    shutil.rmtree(int8_dir)
    return result


def demo_fidelity(work: Path, repeats: int, log) -> dict:
    """Whole generations of the sample clip with the demo model: INT8 stage sets vs torch fp32."""
    from foleyserve.config import EngineConfig
    from foleyserve.export.exporter import export_demo
    from foleyserve.export.quantize import quantize_stages
    from foleyserve.fidelity_measures import log_mel_distance
    from foleyserve.pipeline.demo import sample_clip_path
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest

    fp32 = work / "demo_fp32"
    export_demo(fp32)
    variants = {"ort fp32 (all stages)": (fp32, None)}
    for label, stages in (("ort int8 (encoders + dit)", ["siglip", "synchformer", "clap", "dit"]), ("ort int8 (dit only)", ["dit"]),
                          ("ort int8 (encoders only)", ["siglip", "synchformer", "clap"])):
        folder = work / f"demo_{len(variants)}"
        shutil.copytree(fp32, folder)
        quantize_stages(folder, stages)
        variants[label] = (folder, None)
    ref_engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", device="cpu"))
    request = lambda seed: GenerationRequest(video=sample_clip_path(), prompt="a ball bouncing on a wooden floor", steps=25, seed=seed)  # noqa: E731
    seeds = list(range(repeats))
    refs = {s: ref_engine.generate(request(s)) for s in seeds}
    rows = {"torch fp32": {"median_s": round(statistics.median(sum(refs[s].timings.values()) for s in seeds), 3)}}
    for label, (folder, _) in variants.items():
        engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", device="cpu", backend="onnxruntime", export_dir=folder))
        rel, snr, mel, secs = [], [], [], []
        for s in seeds:
            out = engine.generate(request(s))
            a, b = out.waveform.numpy(), refs[s].waveform.numpy()
            rel.append(_rel(a, b))
            snr.append(_snr(a, b))
            mel.append(float(log_mel_distance(out.waveform, refs[s].waveform)))
            secs.append(sum(out.timings.values()))
        rows[label] = {"rel_l2": statistics.median(rel), "snr_db": round(statistics.median(snr), 2),
                       "log_mel": round(statistics.median(mel), 4), "median_s": round(statistics.median(secs), 3)}
        log(f"demo {label}: {rows[label]}")
    other = ref_engine.generate(request(99))
    rows["reference: torch fp32, another seed"] = {"log_mel": round(statistics.median(
        float(log_mel_distance(other.waveform, refs[s].waveform)) for s in seeds), 4)}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-seeds", type=int, default=3, help="sample-clip generations per variant for the INT8 fidelity table (0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "stages": {}}
    import onnxruntime

    out["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for stage in [s for s in args.stages.split(",") if s]:
            out["stages"][stage] = bench_stage(stage, args.repeats, work, say)
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))
        if args.demo_seeds:
            out["demo_int8_fidelity"] = demo_fidelity(work, args.demo_seeds, say)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
