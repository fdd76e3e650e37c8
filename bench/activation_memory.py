"""Peak host memory added per second of audio by the DiT step and the DAC decode (CPU).

Each measurement runs in a fresh subprocess (clean ``ru_maxrss``): build the network (XXL/XL width
with 1 + 1 blocks, since inference activations are per block and do not grow with depth; the DAC
decoder at the official size), run once at ``--seconds`` lengths and report peak RSS minus the RSS
after building. The slope between two lengths is the activation cost per second of audio that
``foleyserve.autoconfig`` plans with. CPU allocations stand in for CUDA ones: the tensors are the
same; the CUDA caching allocator rounds up (to 2 MiB blocks), so treat these as lower bounds.

    python bench/activation_memory.py --json bench/results/activation_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _child(kind: str, model: str, seconds: float, rows: int) -> None:
    import torch

    from foleyserve.models.dit import build_dit
    from foleyserve.pipeline.lengths import clip_lengths
    from foleyserve.pipeline.random_models import dit_config, random_dac

    torch.set_grad_enabled(False)
    n = clip_lengths(seconds)
    if kind == "dac":
        net = random_dac()
        x = torch.randn(1, 128, n["audio_len"])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        net.decode(x)
    else:
        from foleyserve.pipeline.sampler import sample_latents

        cfg = {**dit_config(model), "depth_triple_blocks": 1, "depth_single_blocks": 1}
        net = build_dit(cfg, dtype=torch.bfloat16)
        net.fuse_for_inference(conv_layout=True)
        d = cfg["clip_dim"]
        args = dict(
            noise=torch.randn(rows, 128, n["audio_len"]), clip_feat=torch.randn(1, n["visual_len"], d),
            sync_feat=torch.randn(1, n["sync_len"], d), text_feat=torch.randn(1, 20, d),
            uncond_text_feat=torch.randn(1, 20, d), steps=1, guidance_scale=4.5,
        )
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sample_latents(net, **args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "model": model, "seconds": seconds, "rows": rows, "added_bytes": (peak - base) * 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", default="2,8")
    p.add_argument("--models", default="xxl")
    p.add_argument("--json")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], a.child[1], float(a.child[2]), int(a.child[3]))
        return
    runs = []
    secs = [float(s) for s in a.seconds.split(",")]
    plans = [("dac", "-", s, 1) for s in secs] + [("dit", m, s, 1) for m in a.models.split(",") for s in secs]
    for kind, model, s, rows in plans:
        out = subprocess.run([sys.executable, __file__, "--child", kind, model, str(s), str(rows)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        runs.append(json.loads(out))
        print(runs[-1], flush=True)
    slopes = {}
    for kind, model in {(r["kind"], r["model"]) for r in runs}:
        rs = sorted((r for r in runs if r["kind"] == kind and r["model"] == model), key=lambda r: r["seconds"])
        if len(rs) >= 2:
            slopes[f"{kind}/{model}"] = (rs[-1]["added_bytes"] - rs[0]["added_bytes"]) / (rs[-1]["seconds"] - rs[0]["seconds"])
    print("bytes per second of audio:", slopes)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "bytes_per_second": slopes}, f, indent=1)


if __name__ == "__main__":
    main()
