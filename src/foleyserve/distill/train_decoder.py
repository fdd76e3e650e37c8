"""Training the light DAC decoder to reproduce the teacher decoder's waveforms.

The training latents are the teacher denoiser's own samples from ``distill prepare`` (what the
decoder sees in deployment), cut into random windows of ``segment`` latent frames; the target is
the teacher decoder's waveform of the same window (computed on the fly, no grad). The loss is
:func:`foleyserve.distill.losses.decoder_loss` (multi-resolution STFT + log-mel + waveform L1).

With ``adversarial_weight > 0`` a HiFi-GAN style discriminator
(:class:`foleyserve.distill.discriminator.DecoderDiscriminator`) joins from iteration
``adversarial_start`` (the spectral losses alone warm the decoder up first): each iteration one
discriminator step (teacher waveform real, light waveform fake) and then the decoder's step on
``spectral + adversarial_weight * (adv + feature_matching_weight * fm)``. It is off by default:
on the demo teacher (600 iterations, weight 1 from iteration 200, CPU) each GAN iteration cost
about 5x a spectral one and the decoder came out worse against the teacher on held-out latents
(log-mel 3.82 vs 3.28 dB, SNR -1.48 vs -0.56 dB; bench/results/distill_decoder_adversarial_cpu.json).
The case for it is the metallic timbre a real-size decoder keeps under spectral losses alone, which
those distances barely register; measure it there before turning it on.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from foleyserve.distill.data import ClipData, load_clips
from foleyserve.distill.loop import end_iteration, update_ema
from foleyserve.distill.discriminator import (
    DecoderDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
)
from foleyserve.distill.light_decoder import LightDecoderConfig, build_light_dac, light_config_for, save_light_decoder
from foleyserve.distill.losses import decoder_loss

STATE_FILE = "decoder_state.pt"
LOG_FILE = "decoder_log.jsonl"


@dataclass
class DecoderTrainOptions:
    iterations: int = 1000
    batch_size: int = 8
    segment: int = 32  # latent frames per window (0.64 s at 50 Hz)
    lr: float = 1e-3
    ema_decay: float = 0.995
    budget: float = 0.18  # of the teacher decoder's parameters
    mel_weight: float = 1.0
    wave_weight: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    adversarial_weight: float = 0.0  # 0: spectral losses only (no discriminator is built)
    feature_matching_weight: float = 2.0  # relative to the adversarial term, as in HiFi-GAN
    adversarial_start: int = 0  # iteration from which the discriminator trains and the GAN terms count


def latent_windows(clips: list[ClipData], batch: int, segment: int, rng: random.Random) -> torch.Tensor:
    """``batch`` random windows ``[B, 128, segment]`` of the teacher's samples (shorter clips: whole)."""
    out = []
    seg = min(segment, min(c.latent_length for c in clips))
    for _ in range(batch):
        clip = rng.choice(clips)
        row = rng.randrange(len(clip.seeds))
        start = rng.randrange(clip.latent_length - seg + 1)
        out.append(clip.latent[row, :, start : start + seg])
    return torch.stack(out)


def train_decoder(
    teacher_dac: torch.nn.Module,
    data: Path,
    out: Path,
    opts: DecoderTrainOptions,
    *,
    device: torch.device = torch.device("cpu"),
    config: LightDecoderConfig | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train (or resume) the light decoder; writes ``out/light-decoder.safetensors`` (EMA weights)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    cfg = config or light_config_for(teacher_dac, budget=opts.budget)
    teacher_dac = teacher_dac.float().to(device).eval()
    light = build_light_dac(cfg).to(device).train()
    ema = copy.deepcopy(light).eval()
    optim = torch.optim.AdamW(light.parameters(), lr=opts.lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, opts.iterations), eta_min=opts.lr * 0.05)
    # Built after the decoder so that its initialisation draws nothing from the decoder's seed.
    disc: DecoderDiscriminator | None = None
    disc_optim: torch.optim.Optimizer | None = None
    if opts.adversarial_weight > 0:
        disc = DecoderDiscriminator().to(device).train()
        disc_optim = torch.optim.AdamW(disc.parameters(), lr=opts.lr, betas=(0.8, 0.99))
    state_path = out / STATE_FILE
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        light.load_state_dict(state["light"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start = int(state["iteration"])
        # A state from a spectral-only run (or from before the option existed) has no discriminator:
        # the GAN, if asked for now, starts from a fresh one.
        if disc is not None and disc_optim is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            disc_optim.load_state_dict(state["disc_optim"])
    clips = load_clips(data)
    rng = random.Random(opts.seed * 7919 + start)
    target = out / "light-decoder.safetensors"
    sample_rate = int(teacher_dac.sample_rate)

    def save(it: int) -> None:
        state = {"light": light.state_dict(), "ema": ema.state_dict(), "optim": optim.state_dict(),
                 "sched": sched.state_dict(), "iteration": it, "options": asdict(opts)}
        if disc is not None and disc_optim is not None:
            state.update(disc=disc.state_dict(), disc_optim=disc_optim.state_dict())
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        ema.light_config = LightDecoderConfig(**{**asdict(cfg), "training": {**asdict(opts), "iterations_done": it, "data": str(data)}})  # type: ignore[attr-defined]
        save_light_decoder(target, ema)

    log = (out / LOG_FILE).open("a")
    t0 = time.perf_counter()
    for it in range(start, opts.iterations):
        z = latent_windows(clips, opts.batch_size, opts.segment, rng).to(device)
        with torch.no_grad():
            wave_t = teacher_dac.decode(z)
        wave_l = light.decode(z)
        loss, parts = decoder_loss(wave_l, wave_t, sample_rate, mel_weight=opts.mel_weight, wave_weight=opts.wave_weight)
        if disc is not None and disc_optim is not None and it >= opts.adversarial_start:
            d_loss = discriminator_loss(disc(wave_t), disc(wave_l.detach()))
            disc_optim.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 10.0)
            disc_optim.step()
            # The decoder's terms use the updated discriminator, frozen so the step fills no D grads.
            disc.requires_grad_(False)
            with torch.no_grad():
                real = disc(wave_t)
            fake = disc(wave_l)
            adv, fm = generator_adv_loss(fake), feature_matching_loss(real, fake)
            disc.requires_grad_(True)
            loss = loss + opts.adversarial_weight * (adv + opts.feature_matching_weight * fm)
            parts.update(adv=adv.item(), fm=fm.item(), disc=d_loss.item())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(light.parameters(), 10.0)
        optim.step()
        sched.step()
        update_ema(ema, light, it, opts.ema_decay)
        record = {"iteration": it + 1, "loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()},
                  "seconds": round(time.perf_counter() - t0, 3)}
        end_iteration(it, opts.iterations, record, log=log, log_every=opts.log_every, checkpoint_every=opts.checkpoint_every,
                      save=save, progress=progress)
    log.close()
    save(opts.iterations)
    return target
