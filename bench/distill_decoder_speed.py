"""Light DAC decoder vs the teacher decoder at REAL size on CPU: parameters and decode time of 10 s.

Random weights (speed does not depend on their values), the official DAC kwargs
(decoder_dim 2048, rates 8-5-4-3-2) and the light config ``light_config_for`` picks for them.
Both decoders run as the engine runs them (fp32, weight norm computed per call) and with weight
norm folded. Medians of ``--repeats`` runs after one warm-up.

    python bench/distill_decoder_speed.py --seconds 10 --repeats 3 --threads 2 --json bench/results/distill_decoder_speed_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from foleyserve.distill.light_decoder import build_light_dac, decoder_params, light_config_for
from foleyserve.models.vae import build_dac
from foleyserve.pipeline.random_models import OFFICIAL_DAC_KWARGS


def _time(dac: torch.nn.Module, z: torch.Tensor, repeats: int) -> list[float]:
    with torch.no_grad():
        dac.decode(z[..., :50])  # warm-up (oneDNN primitive creation)
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            dac.decode(z)
            out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = build_dac(OFFICIAL_DAC_KWARGS, decoder_only=True).eval()
    cfg = light_config_for(teacher)
    light = build_light_dac(cfg).eval()
    z = torch.randn(1, 128, int(args.seconds * 50))
    rows = {}
    for name, model in (("teacher", teacher), ("light", light)):
        for folded in (False, True):
            m = copy.deepcopy(model).fold_weight_norm() if folded else model
            times = _time(m, z, args.repeats)
            rows[f"{name}{'-folded' if folded else ''}"] = {"median_s": statistics.median(times), "runs_s": times}
            print(f"{name:8} folded={folded!s:5} median {statistics.median(times):.3f} s  runs {[round(t, 3) for t in times]}", flush=True)
    result = {
        "what": "DAC decode of random latents at real size (official kwargs), CPU, fp32",
        "seconds_of_audio": args.seconds, "threads": args.threads, "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher_params": decoder_params(teacher), "light_params": decoder_params(light),
        "param_ratio": decoder_params(light) / decoder_params(teacher),
        "light_config": {"channels": list(cfg.channels), "rates": list(cfg.rates), "dilations": list(cfg.dilations)},
        "speedup": rows["teacher"]["median_s"] / rows["light"]["median_s"],
        "speedup_folded": rows["teacher-folded"]["median_s"] / rows["light-folded"]["median_s"],
        "rows": rows, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"params {result['light_params']:,} / {result['teacher_params']:,} = {result['param_ratio']:.3f}; "
          f"speedup {result['speedup']:.2f}x (folded {result['speedup_folded']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
