"""Which layers to keep in fp32 under bf16/fp16: fidelity of each keep list on the conformance fixture.

Each row runs the recorded official 4-step CFG sampling run (tiny fixture weights, its inputs and
initial noise) with the given precision and keep list, and compares the final latents with the
official float64 result (rel_l2) and with our fp32 run. Also reports the DiT weight bytes.

    python bench/keep_fp32.py [--shared ../shared]

``--fp8-exclude`` asks the same question of the fp8 policies' exclude list (which layers keep bf16
weights instead of float8): for each list, the XXL DiT's resident weight bytes relative to bf16
(``weight_bytes_report``, meta device, nothing allocated) and the fixture's fidelity under fp8 and
fp8-weight-only, measured exactly as ``foleyserve fidelity --fixture`` does: final latents vs our
fp32 run (rel_l2, SNR) and vs the official float64 result (rel_l2), and the decoded audio vs our
fp32 audio (SNR, log-mel distance).

    python bench/keep_fp32.py --fp8-exclude [--json bench/results/fp8_exclude_cpu.json]
    python bench/keep_fp32.py --fp8-exclude --random-weights xl    # real-size XL, random weights, 2 s, 4 steps

``--random-weights xl`` runs the same comparison as ``foleyserve fidelity --random-weights xl`` (the
first 2 s of the sample clip through the real-size random encoders, 4 steps; no official result).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foleyserve.fidelity_measures import rel_l2
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


# fp8 exclude lists (module-name patterns that keep bf16 weights under the fp8 policies).
FP8_EXCLUDE_LISTS = {
    # (The default before 79cc94a; ``is_default`` in the JSON rows says which list is the default now.)
    "every modulation producer in bf16": ["*.audio_mod.linear", "*.v_cond_mod.linear", "*.modulation.linear"],
    "single-block modulation in fp8 (triple-block audio_mod, v_cond_mod in bf16)": ["*.audio_mod.linear", "*.v_cond_mod.linear"],
    "triple-block modulation in fp8 (single-block modulation in bf16)": ["*.modulation.linear"],
    "every modulation producer in fp8": [],
}


def fp8_exclude_table(args: argparse.Namespace) -> int:
    import os

    from foleyserve.commands.fidelity import fixture_subject, sample
    from foleyserve.commands.profile import machine_info
    from foleyserve.fidelity_measures import log_mel_distance, snr_db
    from foleyserve.precision import DEFAULT_FP8_EXCLUDE, weight_bytes_report

    os.environ.setdefault("FOLEYSERVE_SHARED", str(args.shared))
    if args.random_weights:
        from foleyserve.commands.fidelity import random_subject
        from foleyserve.commands.profile import check_video
        from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

        def say(line: str) -> None:
            print(f"keep_fp32: {line}", file=sys.stderr, flush=True)

        subject = random_subject(args.random_weights, video=check_video(None), seconds=2.0, seed=0,
                                 prompt="a ball bouncing on a wooden floor", negative=DEFAULT_NEGATIVE_PROMPT,
                                 device=torch.device("cpu"), log=say)
        official = None
    else:
        subject = fixture_subject(torch.device("cpu"))
        official = subject.official["final_latents_fp64"]
    ref_lat, ref_wave, _, _ = sample(subject, subject.reference_dit, steps=4, guidance=4.5, cache=0.0)
    subject.reference_dit = None  # the variants are fresh copies (rebuilt from the seed at real sizes)
    rows = []
    print(f"# {subject.name}; 4 steps, CFG 4.5; every row vs our fp32 run on the same weights, inputs and noise")
    for note in subject.notes:
        print(f"# {note}")
    print()
    print("| fp8 exclude list (bf16 weights) | XXL fp8 bytes / bf16 | policy | fp8 layers (this model) | "
          "latents rel_l2 vs our fp32 | latents SNR dB | latents rel_l2 vs official fp64 | audio SNR dB | log-mel dist dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, exclude in FP8_EXCLUDE_LISTS.items():
        wb = weight_bytes_report(policies=("bf16", "fp8", "fp8-weight-only"), fp8_exclude=exclude)
        for precision in args.fp8_policies.split(","):
            dit = subject.fresh_dit()
            report = apply_policy(dit, precision, fp8_exclude=exclude)
            lat, wave, _, seconds = sample(subject, dit, steps=4, guidance=4.5, cache=0.0)
            row = {
                "label": label, "fp8_exclude": exclude, "is_default": list(exclude) == list(DEFAULT_FP8_EXCLUDE),
                "precision": precision, "fp8_layers": len(report.fp8),
                "xxl_bytes": wb["bytes"][precision], "xxl_bf16_bytes": wb["bytes"]["bf16"],
                "xxl_ratio_to_bf16": wb["ratio_to_bf16"][precision],
                "latents_rel_l2": rel_l2(lat, ref_lat), "latents_snr_db": snr_db(lat, ref_lat),
                "latents_rel_l2_vs_official_fp64": rel_l2(lat, official) if official is not None else None,
                "audio_rel_l2": rel_l2(wave, ref_wave), "audio_snr_db": snr_db(wave, ref_wave),
                "log_mel_db": log_mel_distance(wave, ref_wave, subject.sample_rate), "sampling_s": seconds,
            }
            rows.append(row)
            del dit
            gc.collect()
            vs_official = "-" if official is None else f"{row['latents_rel_l2_vs_official_fp64']:.3e}"
            print(f"| {', '.join(f'`{p}`' for p in exclude) or '(none)'} ({label}) | {row['xxl_ratio_to_bf16']:.3f} | {precision} | "
                  f"{row['fp8_layers']} | {row['latents_rel_l2']:.3e} | {row['latents_snr_db']:.1f} | "
                  f"{vs_official} | {row['audio_snr_db']:.1f} | {row['log_mel_db']:.3f} |", flush=True)
    if official is not None:
        print(f"\nreference: our fp32 run vs the official float64 result: latents rel_l2 {rel_l2(ref_lat, official):.2e}")
    if args.json:
        args.json.write_text(json.dumps({
            "tool": "bench/keep_fp32.py --fp8-exclude", "argv": sys.argv[1:], "machine": machine_info(),
            "subject": subject.name, "steps": 4, "guidance": 4.5,
            "reference_vs_official_fp64": rel_l2(ref_lat, official) if official is not None else None,
            "notes": subject.notes, "rows": rows,
        }, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--fp8-exclude", action="store_true", help="the fp8 exclude-list table instead of the fp32 keep lists")
    ap.add_argument("--json", type=Path, help="with --fp8-exclude: also write the rows as JSON")
    ap.add_argument("--fp8-policies", default="fp8,fp8-weight-only", help="with --fp8-exclude: the policies to run")
    ap.add_argument("--random-weights", choices=("xl",), help="with --fp8-exclude: real-size random XL instead of the fixture")
    args = ap.parse_args(argv)
    if args.fp8_exclude:
        return fp8_exclude_table(args)
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
