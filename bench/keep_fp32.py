"""Which layers to keep in fp32 under bf16/fp16: fidelity of each keep list on the conformance fixture.

Each row runs the recorded official 4-step CFG sampling run (tiny fixture weights, its inputs and
initial noise) with the given precision and keep list, and compares the final latents with the
official float64 result (rel_l2) and with our fp32 run. Also reports the DiT weight bytes.

    python bench/keep_fp32.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foleyserve.metrics import rel_l2
from foleyserve.models import build_dit
from foleyserve.pipeline.sampler import sample_latents
from foleyserve.precision import apply_policy, module_bytes

KEEP_LISTS = {
    "none (official all-low)": [],
    "default: time_in, final_layer": None,
    "+ every modulation": ["time_in", "final_layer", "*.audio_mod", "*.v_cond_mod", "*.modulation"],
    "+ embedders": ["time_in", "final_layer", "audio_embedder", "visual_proj", "cond_in", "sync_in"],
    "+ modulation + embedders": [
        "time_in", "final_layer", "*.audio_mod", "*.v_cond_mod", "*.modulation",
        "audio_embedder", "visual_proj", "cond_in", "sync_in",
    ],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--precisions", default="bf16,fp16")
    args = ap.parse_args(argv)
    fx = args.shared / "reference" / "fixtures"
    path = fx / "tiny_foley_weights.safetensors"
    if not path.is_file():
        print(f"fixtures not found under {fx}; pass --shared", file=sys.stderr)
        return 2
    run = load_file(str(fx / "sampling_2s_cfg4.5_4steps.safetensors"))
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    weights = load_file(str(path))

    def sample(precision: str | None, keep):
        dit = build_dit(config)
        dit.load_state_dict(weights, strict=True)
        if precision is not None:
            apply_policy(dit, precision, keep_fp32=keep)
        out = sample_latents(
            dit, noise=run["initial_noise"], clip_feat=run["siglip2_feat"], sync_feat=run["syncformer_feat"],
            text_feat=run["text_feat"], uncond_text_feat=run["uncond_text_feat"], steps=4, guidance_scale=4.5,
        )
        return out, module_bytes(dit)

    ref32, bytes32 = sample(None, None)
    print("| precision | kept in fp32 | rel_l2 vs official fp64 | rel_l2 vs our fp32 | DiT weight bytes |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | everything | {rel_l2(ref32, run['final_latents_fp64']):.3e} | 0 | {bytes32:,} |")
    for precision in args.precisions.split(","):
        for label, keep in KEEP_LISTS.items():
            out, nbytes = sample(precision, keep)
            print(
                f"| {precision} | {label} | {rel_l2(out, run['final_latents_fp64']):.3e} | "
                f"{rel_l2(out, ref32):.3e} | {nbytes:,} |"
            )
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
