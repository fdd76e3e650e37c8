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
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from foleyserve.distill.data import EVAL_SEED_BASE, ClipData, load_clips
from foleyserve.fidelity_measures import log_mel_distance, rel_l2, snr_db
from foleyserve.pipeline.sampler import initial_noise, sample_latents


@dataclass
class Variant:
    """One way of producing a clip's audio: a denoiser run (or the reference latents) and a decoder."""

    name: str
    dit: torch.nn.Module | None  # None: the reference latents themselves
    steps: int
    guidance: float
    decoder: torch.nn.Module
    rows: list[dict[str, Any]] = field(default_factory=list)


def _sample(dit, clip: ClipData, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    return sample_latents(
        dit, noise=noise, clip_feat=clip.siglip[None], sync_feat=clip.sync[None], text_feat=clip.text[None],
        uncond_text_feat=clip.uncond[None], steps=steps, guidance_scale=guidance,
    )


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
    light_decoder: torch.nn.Module | None = None,
    guidance: float = 4.5,
    reference_steps: int = 50,
    seeds_per_clip: int = 2,
    max_clips: int | None = None,
    scorers: Any | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure every variant on the clips of ``data``; returns the report (see :func:`table`)."""
    clips = load_clips(data)[: max_clips or None]
    variants: list[Variant] = []
    for k in sorted(students):
        variants.append(Variant(f"teacher-{k}-cfg", teacher_dit, k, guidance, teacher_dac))
        variants.append(Variant(f"student-{k}", students[k], k, 1.0, teacher_dac))
        if light_decoder is not None:
            variants.append(Variant(f"student-{k}+light", students[k], k, 1.0, light_decoder))
    if light_decoder is not None:
        variants.append(Variant("light-decoder", None, reference_steps, guidance, light_decoder))
    ref_seconds: list[float] = []
    ref_scores: dict[str, list[float]] = {}
    sample_rate = int(teacher_dac.sample_rate)
    for ci, clip in enumerate(clips):
        seeds = [EVAL_SEED_BASE + ci * seeds_per_clip + s for s in range(seeds_per_clip)]
        noise = torch.cat([initial_noise(1, clip.latent_length, seed=s) for s in seeds])
        ref, t_ref = _timed(lambda: _sample(teacher_dit, clip, noise, reference_steps, guidance))
        ref_wave, t_dec = _timed(lambda: teacher_dac.decode(ref).float())
        ref_seconds.append((t_ref + t_dec) / len(seeds))
        cache: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
        for v in variants:
            if v.dit is None:
                lat, t_dit = ref, 0.0
            else:
                key = (id(v.dit), v.steps)
                if key not in cache:
                    cache[key] = _timed(lambda: _sample(v.dit, clip, noise, v.steps, v.guidance))
                lat, t_dit = cache[key]
            wave, t_decode = _timed(lambda: v.decoder.decode(lat).float())
            for i in range(len(seeds)):
                row = {
                    "clip": ci, "seed": seeds[i],
                    "latent_rel_l2": rel_l2(lat[i], ref[i]),
                    "snr_db": snr_db(wave[i, 0], ref_wave[i, 0]),
                    "log_mel_db": log_mel_distance(wave[i, 0], ref_wave[i, 0], sample_rate),
                    "denoise_s": t_dit / len(seeds), "decode_s": t_decode / len(seeds),
                }
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
        if progress:
            progress(ci + 1, len(clips))
    report = {
        "clips": len(clips), "seeds_per_clip": seeds_per_clip, "reference": f"teacher-{reference_steps}-cfg{guidance:g}",
        "reference_seconds_per_clip": statistics.median(ref_seconds) if ref_seconds else None,
        "variants": {v.name: _summary(v) for v in variants},
    }
    if scorers is not None:
        report["reference_scores"] = {k: statistics.mean(vals) for k, vals in ref_scores.items()}
    return report


def _score(scorers, clip: ClipData, wave: torch.Tensor, rows: list[dict], sample_rate: int) -> None:
    from foleyserve.scoring import clap_audio_text_score, desync_score

    clap = clap_audio_text_score(scorers, wave[:, 0], clip.info.get("prompt", ""), sample_rate=sample_rate)
    sync = desync_score(scorers, None, wave[:, 0], sample_rate=sample_rate, sync_feat=clip.sync[None])
    for row, c, s in zip(rows, clap, sync):
        row["clap"] = c
        row["desync_s"] = s["desync"]


def _summary(v: Variant) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": v.steps if v.dit is not None else None, "cfg": v.guidance > 1.0 if v.dit is not None else None}
    for key in ("latent_rel_l2", "snr_db", "log_mel_db", "denoise_s", "decode_s", "clap", "desync_s"):
        vals = [r[key] for r in v.rows if r.get(key) is not None]
        if vals:
            out[key] = statistics.mean(vals) if key not in ("denoise_s", "decode_s") else statistics.median(vals)
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
    return "\n".join(lines)
