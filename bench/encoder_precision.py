#!/usr/bin/env python3
"""What the visual encoders' precision does to their features, on any device.

The engine runs SigLIP2 in fp32 and Synchformer in fp32, except that on CUDA under a
low-precision policy Synchformer runs under fp16 autocast, as the official pipeline does
(``Engine.encode_visual``). That path never ran before this benchmark. Here each encoder (real-size
random weights, or the conformance fixture's tiny Synchformer with ``--fixture``) encodes the frames
of the bundled sample clip (or ``--video``) in fp32 and under each autocast dtype; with CUDA, fp32
with TF32 allowed as well. Features are compared with an fp32 reference computed with TF32 off:
rel_l2 and max_abs, and whether anything overflowed.

    python bench/encoder_precision.py                       # CPU: autocast fp16 and bf16
    python bench/encoder_precision.py --device cuda --json bench/results/encoder_precision_cuda.json

CPU and CUDA autocast cast different op lists, so a CPU number bounds the effect, it does not
reproduce the GPU's arithmetic: the device check runs this on the GPU (``measure``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def _tf32(allowed: bool):
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _frames(video: Path | None, max_sync_frames: int, max_siglip_frames: int) -> tuple[Any, Any]:
    from foleyserve import media
    from foleyserve.pipeline.demo import sample_clip_path

    decoded = media.decode_frames(str(video or sample_clip_path()), fps_list=(8, 25), max_seconds=15.0)
    return decoded.frames[8][:max_siglip_frames], decoded.frames[25][:max_sync_frames]


def measure(device: torch.device, *, video: Path | None = None, fixture: Path | None = None,
            max_sync_frames: int = 48, max_siglip_frames: int = 40, seed: int = 0,
            encoders: tuple[str, ...] = ("synchformer", "siglip2")) -> dict[str, Any]:
    """One row per (encoder, mode): rel_l2 / max_abs against fp32 with TF32 off, and seconds."""
    from foleyserve import media
    from foleyserve.models.encoders import build_siglip_vision, encode_frames_siglip
    from foleyserve.pipeline.random_models import random_synchformer

    frames8, frames25 = _frames(video, max_sync_frames, max_siglip_frames)
    if fixture is not None:
        from safetensors.torch import load_file

        from foleyserve.models.synchformer import build_synchformer_visual

        sd = load_file(str(fixture))
        # The fixture's tiny ViT: its width and depth read off the weights.
        width = sd["vfeat_extractor.cls_token"].shape[-1] if "vfeat_extractor.cls_token" in sd else 64
        depth = len({k.split(".")[2] for k in sd if k.startswith("vfeat_extractor.blocks.")}) or 2
        synch = build_synchformer_visual(embed_dim=width, num_heads=2, depth=depth)
        synch.load_state_dict(sd, strict=True)
        synch = synch.to(device).eval()
    else:
        synch = random_synchformer(device=device, seed=seed).eval()
    sync_pixels = media.synchformer_pixels(frames25).unsqueeze(0).to(device)
    runs = {"synchformer": lambda: synch.encode(sync_pixels, batch_size=8)}
    if "siglip2" in encoders:
        siglip = build_siglip_vision(seed=seed, device=device).eval()
        sig_pixels = media.siglip_pixels(frames8).to(device)
        runs["siglip2"] = lambda: encode_frames_siglip(siglip, sig_pixels, batch_size=16)
    modes: list[tuple[str, torch.dtype | None, bool]] = [("fp32", None, False)]
    if device.type == "cuda":
        modes.append(("fp32+tf32", None, True))
    modes += [("autocast-fp16", torch.float16, False), ("autocast-bf16", torch.bfloat16, False)]
    rows = []
    with torch.no_grad():
        for name, run in runs.items():
            ref = None
            for mode, dtype, tf32 in modes:
                ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with _tf32(tf32), ctx:
                    start = time.perf_counter()
                    out = run().float()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - start
                if ref is None:
                    ref = out
                finite = bool(torch.isfinite(out).all())
                rows.append({
                    "encoder": name, "mode": mode, "seconds": round(seconds, 4), "finite": finite,
                    "rel_l2": _rel_l2(out, ref) if finite else None,
                    "max_abs": float((out - ref).abs().max()) if finite else None,
                    "shape": list(out.shape),
                })
    return {
        "device": str(device),
        "weights": f"fixture {fixture.name}" if fixture is not None else "random, real size",
        "frames": {"siglip2_8fps": int(len(frames8)), "synchformer_25fps": int(len(frames25))},
        "engine_uses": {"siglip2": "fp32 (TF32 off)", "synchformer": "fp16 autocast on CUDA under non-fp32 policies, else fp32"},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--video", type=Path)
    p.add_argument("--fixture", type=Path, help="the tiny Synchformer fixture weights instead of real-size random ones")
    p.add_argument("--max-sync-frames", type=int, default=48, help="25 fps frames given to Synchformer (48 = 5 windows)")
    p.add_argument("--max-siglip-frames", type=int, default=40, help="8 fps frames given to SigLIP2")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = measure(torch.device(args.device), video=args.video, fixture=args.fixture, max_sync_frames=args.max_sync_frames,
                     max_siglip_frames=args.max_siglip_frames)
    print(f"# encoder precision on {result['device']} ({result['weights']}); reference: fp32, TF32 off")
    print("| encoder | mode | rel_l2 | max_abs | finite | s |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        rel = "ref" if r["mode"] == "fp32" else (f"{r['rel_l2']:.2e}" if r["rel_l2"] is not None else "-")
        mx = f"{r['max_abs']:.2e}" if r["max_abs"] is not None else "-"
        print(f"| {r['encoder']} | {r['mode']} | {rel} | {mx} | {r['finite']} | {r['seconds']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
