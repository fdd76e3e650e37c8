"""Flow-matching Euler sampling with classifier-free guidance, as the official denoise loop does it.

The model predicts the velocity v = noise - data along x_t = t * noise + (1 - t) * data. Starting
from pure noise at sigma = 1 we integrate down to sigma = 0:

    v_i     = v_u + s * (v_c - v_u)                (CFG; v_u from the unconditional row)
    x_{i+1} = x_i + v_i * (sigma_{i+1} - sigma_i)  (Euler, float32)

with sigmas = linspace(1, 0, N + 1) in float32 (optionally SD3-shifted) and the model fed
t_i = 1000 * sigma_i. The unconditional branch replaces BOTH visual streams by the model's learned
empty vectors and uses the negative prompt's text features.

One deliberate difference from the official loop: the initial noise is drawn by a seeded CPU
``torch.Generator`` in float32 (:func:`initial_noise`), so a seed gives the same audio on any
device and precision. The official code draws it from the global CUDA RNG directly in bf16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from foleyserve.models.dit import DiTConditions, FoleyDiT


@dataclass(frozen=True)
class FlowMatchSchedule:
    timesteps: torch.Tensor  # [N] float32, model time on the 0..1000 scale
    sigmas: torch.Tensor  # [N + 1] float32, from 1 down to 0

    @property
    def steps(self) -> int:
        return self.timesteps.numel()


def flow_match_schedule(
    steps: int, *, shift: float = 1.0, reverse: bool = True, num_train_timesteps: int = 1000
) -> FlowMatchSchedule:
    """The official ``FlowMatchDiscreteScheduler.set_timesteps`` table (no flux shift)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigmas = torch.linspace(1, 0, steps + 1)
    if shift != 1.0:
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    if not reverse:
        sigmas = 1 - sigmas
    timesteps = (sigmas[:-1] * num_train_timesteps).to(torch.float32)
    return FlowMatchSchedule(timesteps=timesteps, sigmas=sigmas)


def initial_noise(
    batch: int, length: int, *, seed: int, channels: int = 128, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Seeded float32 noise ``[batch, channels, length]``, identical on every device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((batch, channels, length), generator=gen, dtype=torch.float32).to(device)


def _expand_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch}")


def cfg_inputs(
    dit: FoleyDiT,
    *,
    clip_feat: torch.Tensor,
    sync_feat: torch.Tensor,
    text_feat: torch.Tensor,
    uncond_text_feat: torch.Tensor,
    batch: int,
    guidance: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs for one step: ``[uncond rows ; cond rows]`` when guiding, else cond rows only."""
    dev = dit.device
    clip = _expand_batch(clip_feat, batch, "clip_feat").to(dev)
    sync = _expand_batch(sync_feat, batch, "sync_feat").to(dev)
    text = _expand_batch(text_feat, batch, "text_feat").to(dev)
    if not guidance:
        return clip, sync, text
    uncond_text = _expand_batch(uncond_text_feat, batch, "uncond_text_feat").to(dev)
    if uncond_text.shape[1] != text.shape[1]:
        raise ValueError(
            f"text_feat has {text.shape[1]} tokens and uncond_text_feat {uncond_text.shape[1]}: "
            "encode the prompt and the negative prompt together so they are padded to one length"
        )
    empty_clip, empty_sync = dit.empty_visual(batch, clip.shape[1], sync.shape[1])
    # torch.cat promotes the (possibly bf16) learned empty vectors to the features' dtype, as the
    # official loop does.
    return (
        torch.cat((empty_clip, clip), 0),
        torch.cat((empty_sync, sync), 0),
        torch.cat((uncond_text, text), 0),
    )


def _autocast_for(dit: FoleyDiT) -> contextlib.AbstractContextManager:
    # A low-precision model runs under autocast like the official loop; fp32 runs without it.
    if dit.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=dit.device.type, dtype=dit.dtype)
    return contextlib.nullcontext()


StepCallback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def sample_latents(
    dit: FoleyDiT,
    *,
    noise: torch.Tensor,
    clip_feat: torch.Tensor,
    sync_feat: torch.Tensor,
    text_feat: torch.Tensor,
    uncond_text_feat: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 4.5,
    shift: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the official denoising loop and return the final latents ``[B, 128, La]`` (float32).

    Features may have batch 1 (shared by every noise row, as the official ``batch_size`` option
    does) or the noise's batch. ``callback(step, total, latents)`` is called after every step.
    """
    batch, _, length = noise.shape
    guidance = guidance_scale is not None and guidance_scale > 1.0
    schedule = flow_match_schedule(steps, shift=shift)
    clip, sync, text = cfg_inputs(
        dit,
        clip_feat=clip_feat,
        sync_feat=sync_feat,
        text_feat=text_feat,
        uncond_text_feat=uncond_text_feat,
        batch=batch,
        guidance=guidance,
    )
    with _autocast_for(dit):
        conditions: DiTConditions = dit.prepare_conditions(clip_feat=clip, sync_feat=sync, cond=text, audio_len=length)
    latents = noise.to(device=dit.device, dtype=torch.float32)
    rows = 2 * batch if guidance else batch
    sigmas = schedule.sigmas.to(dit.device)
    for i, t in enumerate(schedule.timesteps.to(dit.device)):
        x_in = torch.cat((latents, latents), 0) if guidance else latents
        with _autocast_for(dit):
            velocity = dit.predict_flow(x_in, t.repeat(rows), conditions).float()
        if guidance:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = latents + velocity * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i + 1, schedule.steps, latents)
    return latents
