"""Does the adversarial term help the light decoder? Two runs, same seed and iterations, measured
against the teacher decoder on held-out latents (the demo teacher, CPU).

Held-out latents are what ``distill eval`` uses: the teacher's 50-step CFG 4.5 samples of the
prepared clips at seeds from EVAL_SEED_BASE (never handed out by ``distill prepare``). Each light
decoder's waveform is compared with the teacher decoder's on the same latents: log-mel distance (dB),
waveform SNR (dB) and the multi-resolution STFT distance of the training loss. Seconds per training
iteration come from each run's JSON log (for a run with a warm-up, also split at its start).

    python bench/distill_decoder_adversarial.py --data /tmp/turbo/data --run A=/tmp/advA --run B=/tmp/advB
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from foleyserve.distill.data import EVAL_SEED_BASE, load_clips
from foleyserve.distill.light_decoder import load_light_decoder
from foleyserve.distill.losses import multi_resolution_stft_loss
from foleyserve.distill.train_decoder import LOG_FILE, STATE_FILE
from foleyserve.distill.turbo import teacher_components
from foleyserve.fidelity_measures import log_mel_distance, snr_db
from foleyserve.pipeline.sampler import initial_noise, sample_latents


def seconds_per_iteration(run: Path) -> dict[str, float | None]:
    """s/iteration from a run's log: the mean over the run, and the median over its logged intervals
    (robust to a stretch where another process took the CPU), also split at the adversarial start."""
    rows = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines() if line.strip()]
    opts = torch.load(run / STATE_FILE, weights_only=False, map_location="cpu")["options"]
    start = int(opts.get("adversarial_start", 0)) if opts.get("adversarial_weight", 0) > 0 else 0
    steps = [((b["seconds"] - a["seconds"]) / (b["iteration"] - a["iteration"]), b["iteration"])
             for a, b in zip(rows, rows[1:]) if b["seconds"] > a["seconds"]]  # a resume restarts the clock
    out: dict[str, float | None] = {"mean": rows[-1]["seconds"] / rows[-1]["iteration"],
                                    "median": statistics.median(v for v, _ in steps)}
    if start:
        out["median_spectral_phase"] = statistics.median(v for v, it in steps if it <= start)
        out["median_adversarial_phase"] = statistics.median(v for v, it in steps if it > start)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/tmp/turbo/data"))
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_FOLDER (repeat)")
    ap.add_argument("--seeds-per-clip", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distill_decoder_adversarial_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    comps = teacher_components({"demo": True}, device)
    teacher_dac = comps.dac.float().eval()
    runs = {name: Path(folder) for name, folder in (r.split("=", 1) for r in args.run)}
    lights = {name: load_light_decoder(folder / "light-decoder.safetensors", device=device) for name, folder in runs.items()}
    sr = int(teacher_dac.sample_rate)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for ci, clip in enumerate(load_clips(args.data)):
        seeds = [EVAL_SEED_BASE + ci * args.seeds_per_clip + s for s in range(args.seeds_per_clip)]
        noise = torch.cat([initial_noise(1, clip.latent_length, seed=s) for s in seeds])
        lat = sample_latents(comps.dit, noise=noise, clip_feat=clip.siglip[None], sync_feat=clip.sync[None],
                             text_feat=clip.text[None], uncond_text_feat=clip.uncond[None], steps=args.steps,
                             guidance_scale=args.guidance)
        ref = teacher_dac.decode(lat).float()
        for name, light in lights.items():
            wave = light.decode(lat).float()
            for i in range(len(seeds)):
                rows[name].append({"log_mel_db": log_mel_distance(wave[i, 0], ref[i, 0], sr),
                                   "snr_db": snr_db(wave[i, 0], ref[i, 0]),
                                   "stft_distance": multi_resolution_stft_loss(wave[i], ref[i]).item()})
    report = {
        "data": str(args.data), "held_out": f"{len(rows[next(iter(rows))])} latents: teacher {args.steps} steps CFG {args.guidance:g}, "
                                            f"seeds from EVAL_SEED_BASE ({EVAL_SEED_BASE})",
        "threads": args.threads,
        "decoders": {
            name: {
                "run": str(runs[name]),
                "options": torch.load(runs[name] / STATE_FILE, weights_only=False, map_location="cpu")["options"],
                **{k: statistics.mean(r[k] for r in rows[name]) for k in ("log_mel_db", "snr_db", "stft_distance")},
                "seconds_per_iteration": seconds_per_iteration(runs[name]),
            }
            for name in runs
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out: {report['held_out']}")
    print("| decoder | adversarial weight (start) | log-mel dB | SNR dB | MR-STFT distance | s/iteration (median; GAN phase) |")
    print("|---|---|---|---|---|---|")
    for name, d in report["decoders"].items():
        o, s = d["options"], d["seconds_per_iteration"]
        gan = f"{o.get('adversarial_weight', 0):g} ({o.get('adversarial_start', 0)})"
        phase = f"; {s['median_adversarial_phase']:.3f}" if s.get("median_adversarial_phase") else ""
        print(f"| {name} | {gan} | {d['log_mel_db']:.2f} | {d['snr_db']:.2f} | {d['stft_distance']:.4f} | {s['median']:.3f}{phase} |")


if __name__ == "__main__":
    main()
