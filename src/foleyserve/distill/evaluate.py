"""`foleyserve distill eval`: the student at K steps against the teacher at 50 guided steps.

Every row is measured against the reference (the teacher's ``reference_steps``-step CFG sample,
decoded by the teacher decoder), on noise seeds that ``distill prepare`` never hands out
(:data:`~foleyserve.distill.data.EVAL_SEED_BASE` upwards), for the clips of a prepared folder:

* ``teacher-K-cfg``: the teacher at K steps with CFG, the baseline the student must beat;
* ``student-K``: the student at K steps without CFG (teacher decoder);
* ``student-K+light``: the same latents through the light decoder (the turbo tier end to end);
* ``light-decoder``: the light decoder on the reference latents (the decoder's own error).

Measures: latent rel_l2, waveform SNR (dB), log-mel distance (dB), CLAP text-match and DeSync
where scorers are given (DeSync needs clips of at least 4.8 s), and seconds per clip of the
denoiser and the decoder.

Two diagnostics say where a student's error comes from:

* ``step_rel_l2``: after each of a K-step run's steps, its state against the reference path's state
  at the same noise level. An error made in the first window and carried (or amplified) through
  the rest reads very differently from one made at the end.
* ``train_noise`` (``train_seeds`` > 0): the students again on the first seeds the data was
  prepared with. A student much closer on its training noise than on new noise has memorised it:
  it needs more (clip, seed) pairs, not more iterations.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from foleyserve.distill.data import EVAL_SEED_BASE, ClipData, TrajectoryRecorder, load_clips
from foleyserve.fidelity_measures import log_mel_distance, rel_l2, snr_db
from foleyserve.pipeline.sampler import flow_match_schedule, initial_noise, sample_latents


@dataclass
class Variant:
    """One way of producing a clip's audio: a denoiser run (or the reference latents) and a decoder."""

    name: str
    dit: torch.nn.Module | None  # None: the reference latents themselves
    steps: int
    guidance: float
    decoder: torch.nn.Module
    student: bool = False
    shift: float = 1.0  # the run's time shift (a student's recipe; the teacher's schedule is uniform)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _sample(dit, clip: ClipData, noise: torch.Tensor, steps: int, guidance: float, callback=None, shift: float = 1.0) -> torch.Tensor:
    return sample_latents(
        dit, noise=noise, clip_feat=clip.siglip[None], sync_feat=clip.sync[None], text_feat=clip.text[None],
        uncond_text_feat=clip.uncond[None], steps=steps, guidance_scale=guidance, callback=callback, shift=shift,
    )


def _grid(steps: int, shift: float = 1.0) -> list[float]:
    """The noise levels a K-step run's states sit at after steps 1..K-1 (the last is the sample)."""
    return [round(float(x), 9) for x in flow_match_schedule(steps, shift=shift).sigmas[1:-1]]


def _sample_with_states(dit, clip: ClipData, noise: torch.Tensor, steps: int, guidance: float, shift: float
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    states: list[torch.Tensor] = []
    out = _sample(dit, clip, noise, steps, guidance, callback=lambda _i, _n, x: states.append(x.float().cpu().clone()), shift=shift)
    return out, states[:-1]


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def evaluate(
    teacher_dit: torch.nn.Module,
    teacher_dac: torch.nn.Module,
    data: Path,
    *,
    students: dict[int, torch.nn.Module],
    student_shifts: dict[int, float] | None = None,
    light_decoder: torch.nn.Module | None = None,
    guidance: float = 4.5,
    reference_steps: int = 50,
    seeds_per_clip: int = 2,
    max_clips: int | None = None,
    scorers: Any | None = None,
    train_seeds: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure every variant on the clips of ``data``; returns the report (see :func:`table`).

    ``train_seeds`` > 0 also runs the students on that many of each clip's training seeds
    (``report["train_noise"]``), to tell memorisation from a lack of capacity or iterations.
    """
    clips = load_clips(data)[: max_clips or None]
    variants: list[Variant] = []
    for k in sorted(students):
        variants.append(Variant(f"teacher-{k}-cfg", teacher_dit, k, guidance, teacher_dac))
        shift = (student_shifts or {}).get(k, 1.0)
        variants.append(Variant(f"student-{k}", students[k], k, 1.0, teacher_dac, student=True, shift=shift))
        if light_decoder is not None:
            variants.append(Variant(f"student-{k}+light", students[k], k, 1.0, light_decoder, student=True, shift=shift))
    if light_decoder is not None:
        variants.append(Variant("light-decoder", None, reference_steps, guidance, light_decoder))
    levels = sorted({x for v in variants if v.dit is not None for x in _grid(v.steps, v.shift)}, reverse=True)
    ref_seconds: list[float] = []
    ref_scores: dict[str, list[float]] = {}
    for ci, clip in enumerate(clips):
        seeds = [EVAL_SEED_BASE + ci * seeds_per_clip + s for s in range(seeds_per_clip)]
        t_ref = _measure_clip(clip, ci, seeds, "new", variants, teacher_dit, teacher_dac, guidance, reference_steps, levels,
                              scorers, ref_scores)
        ref_seconds.append(t_ref)
        if train_seeds:
            _measure_clip(clip, ci, clip.seeds[:train_seeds], "train", [v for v in variants if v.student], teacher_dit,
                          teacher_dac, guidance, reference_steps, levels, None, None)
        if progress:
            progress(ci + 1, len(clips))
    report = {
        "clips": len(clips), "seeds_per_clip": seeds_per_clip, "reference": f"teacher-{reference_steps}-cfg{guidance:g}",
        "reference_seconds_per_clip": statistics.median(ref_seconds) if ref_seconds else None,
        "variants": {v.name: _summary(v, "new") for v in variants},
    }
    if train_seeds:
        report["train_seeds_per_clip"] = min(train_seeds, min((len(c.seeds) for c in clips), default=0))
        report["train_noise"] = {v.name: _summary(v, "train") for v in variants if v.student}
    if scorers is not None:
        report["reference_scores"] = {k: statistics.mean(vals) for k, vals in ref_scores.items()}
    return report


def _measure_clip(clip: ClipData, ci: int, seeds: list[int], split: str, variants: list[Variant], teacher_dit, teacher_dac,
                  guidance: float, reference_steps: int, levels: list[float], scorers, ref_scores) -> float:
    """Every variant on one clip's ``seeds``, rows tagged ``split``; returns the reference's seconds per sample."""
    sample_rate = int(teacher_dac.sample_rate)
    noise = torch.cat([initial_noise(1, clip.latent_length, seed=s) for s in seeds])
    recorder = TrajectoryRecorder(flow_match_schedule(reference_steps).sigmas, levels, noise)
    ref, t_ref = _timed(lambda: _sample(teacher_dit, clip, noise, reference_steps, guidance, callback=recorder))
    ref_states = dict(zip(levels, recorder.states))
    ref_wave, t_dec = _timed(lambda: teacher_dac.decode(ref).float())
    cache: dict[tuple[int, int], tuple[tuple[torch.Tensor, list[torch.Tensor]], float]] = {}
    for v in variants:
        if v.dit is None:
            (lat, states), t_dit = (ref, []), 0.0
        else:
            key = (id(v.dit), v.steps)
            if key not in cache:
                cache[key] = _timed(lambda: _sample_with_states(v.dit, clip, noise, v.steps, v.guidance, v.shift))
            (lat, states), t_dit = cache[key]
        wave, t_decode = _timed(lambda: v.decoder.decode(lat).float())
        levels_v = _grid(v.steps, v.shift)
        for i in range(len(seeds)):
            row = {
                "clip": ci, "seed": seeds[i], "split": split,
                "latent_rel_l2": rel_l2(lat[i], ref[i]),
                "snr_db": snr_db(wave[i, 0], ref_wave[i, 0]),
                "log_mel_db": log_mel_distance(wave[i, 0], ref_wave[i, 0], sample_rate),
                "denoise_s": t_dit / len(seeds), "decode_s": t_decode / len(seeds),
            }
            if v.dit is not None:
                row["step_rel_l2"] = [rel_l2(x[i], ref_states[lv][i].to(x.device)) for x, lv in zip(states, levels_v)] + [row["latent_rel_l2"]]
            v.rows.append(row)
        if scorers is not None:
            _score(scorers, clip, wave, v.rows[-len(seeds):], sample_rate)
    if scorers is not None:
        ref_rows = [{} for _ in seeds]
        _score(scorers, clip, ref_wave, ref_rows, sample_rate)
        for r in ref_rows:
            for key, val in r.items():
                if val is not None:
                    ref_scores.setdefault(key, []).append(val)
    return (t_ref + t_dec) / len(seeds)


def _score(scorers, clip: ClipData, wave: torch.Tensor, rows: list[dict], sample_rate: int) -> None:
    from foleyserve.scoring import clap_audio_text_score, desync_score

    clap = clap_audio_text_score(scorers, wave[:, 0], clip.info.get("prompt", ""), sample_rate=sample_rate)
    sync = desync_score(scorers, None, wave[:, 0], sample_rate=sample_rate, sync_feat=clip.sync[None])
    for row, c, s in zip(rows, clap, sync):
        row["clap"] = c
        row["desync_s"] = s["desync"]


def _summary(v: Variant, split: str) -> dict[str, Any]:
    rows = [r for r in v.rows if r["split"] == split]
    out: dict[str, Any] = {"steps": v.steps if v.dit is not None else None, "cfg": v.guidance > 1.0 if v.dit is not None else None}
    for key in ("latent_rel_l2", "snr_db", "log_mel_db", "denoise_s", "decode_s", "clap", "desync_s"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[key] = statistics.mean(vals) if key not in ("denoise_s", "decode_s") else statistics.median(vals)
    per_step = [r["step_rel_l2"] for r in rows if "step_rel_l2" in r]
    if per_step:
        out["step_rel_l2"] = [statistics.mean(col) for col in zip(*per_step)]
    return out


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per variant)."""
    cols = [("latent_rel_l2", "latent rel_l2", "{:.3f}"), ("snr_db", "SNR dB", "{:.2f}"), ("log_mel_db", "log-mel dB", "{:.2f}"),
            ("clap", "CLAP", "{:.3f}"), ("desync_s", "DeSync s", "{:.2f}"), ("denoise_s", "denoise s/clip", "{:.3f}"),
            ("decode_s", "decode s/clip", "{:.3f}")]
    lines = [f"reference: {report['reference']} ({report['clips']} clips x {report['seeds_per_clip']} held-out seeds)",
             "| variant | steps | CFG | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name, s in report["variants"].items():
        cells = [fmt.format(s[key]) if s.get(key) is not None else "-" for key, _, fmt in cols]
        steps = "-" if s["steps"] is None else str(s["steps"])
        cfg = "-" if s["cfg"] is None else ("yes" if s["cfg"] else "no")
        lines.append(f"| {name} | {steps} | {cfg} | " + " | ".join(cells) + " |")
    paths = {n: s["step_rel_l2"] for n, s in report["variants"].items() if s.get("step_rel_l2") and "+light" not in n}
    if paths:
        lines += ["", "latent rel_l2 to the reference path after each step (new noise):"]
        lines += [f"  {n}: " + " -> ".join(f"{x:.3f}" for x in errs) for n, errs in paths.items()]
    train = {n: s for n, s in report.get("train_noise", {}).items() if "+light" not in n}
    if train:
        lines += ["", f"on training noise ({report['train_seeds_per_clip']} seeds per clip) vs new noise:"]
        for n, s in train.items():
            new = report["variants"][n]
            lines.append(f"  {n}: latent rel_l2 {s['latent_rel_l2']:.3f} vs {new['latent_rel_l2']:.3f}, "
                         f"log-mel {s['log_mel_db']:.2f} vs {new['log_mel_db']:.2f} dB")
    return "\n".join(lines)
