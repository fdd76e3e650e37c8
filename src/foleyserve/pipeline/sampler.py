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
from foleyserve.pipeline.stepcache import StepCache


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
    # A precision policy (foleyserve.precision) states its autocast dtype explicitly.
    dtype = getattr(dit, "autocast_dtype", dit.dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=dit.device.type, dtype=dtype)
    return contextlib.nullcontext()


StepCallback = Callable[[int, int, torch.Tensor], None]
# Asked before every step: which rows still want their result (False = cancelled). None: all.
KeepRows = Callable[[], "list[bool] | None"]


def _guidance_vector(guidance_scale: float | list[float] | torch.Tensor, batch: int) -> torch.Tensor:
    g = torch.as_tensor(guidance_scale, dtype=torch.float32).flatten()
    if g.numel() == 1:
        g = g.expand(batch)
    if g.numel() != batch:
        raise ValueError(f"{g.numel()} guidance scales for {batch} rows")
    return g


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
    guidance_scale: float | list[float] | torch.Tensor = 4.5,
    shift: float = 1.0,
    callback: StepCallback | None = None,
    text_lengths: list[int] | None = None,
    step_cache: StepCache | None = None,
    keep_rows: KeepRows | None = None,
) -> torch.Tensor:
    """Run the official denoising loop and return the final latents ``[B, 128, La]`` (float32).

    Features may have batch 1 (shared by every noise row, as the official ``batch_size`` option
    does) or the noise's batch. ``callback(step, total, latents)`` is called after every step.

    Batching several requests: ``guidance_scale`` may give one scale per row (all above 1, or all
    at most 1: guidance on or off is one batch layout), ``text_lengths`` the real prompt length of
    each row when the text features were padded to a common length. ``keep_rows`` is asked before
    each step; rows it reports False stop being computed (their returned latents are meaningless).
    ``step_cache`` skips blocks on rows that change slowly (see :mod:`.stepcache`).
    """
    batch, _, length = noise.shape
    scales = _guidance_vector(guidance_scale, batch)
    guided = scales > 1.0
    if bool(guided.any()) != bool(guided.all()):
        raise ValueError("rows with guidance > 1 and rows without cannot share a batch")
    guidance = bool(guided.all())
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
    lengths = None
    if text_lengths is not None:
        lengths = list(text_lengths) * (2 if guidance else 1)
    with _autocast_for(dit):
        conditions: DiTConditions = dit.prepare_conditions(
            clip_feat=clip, sync_feat=sync, cond=text, audio_len=length, text_lengths=lengths
        )
    latents = noise.to(device=dit.device, dtype=torch.float32).clone()
    scales = scales.to(dit.device).view(batch, 1, 1)
    sigmas = schedule.sigmas.to(dit.device)
    alive = torch.arange(batch, device=dit.device)  # rows still computed
    for i, t in enumerate(schedule.timesteps.to(dit.device)):
        if keep_rows is not None:
            wanted = keep_rows()
            if wanted is not None:
                keep = torch.tensor([bool(wanted[r]) for r in alive.tolist()], device=dit.device)
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        break
                    local = keep.nonzero().flatten()
                    rows = torch.cat((local, local + alive.numel())) if guidance else local
                    conditions = conditions.select(rows)
                    if step_cache is not None:
                        step_cache.select(rows)
                    alive = alive[local]
        x = latents[alive] if alive.numel() != batch else latents
        x_in = torch.cat((x, x), 0) if guidance else x
        with _autocast_for(dit):
            velocity = dit.predict_flow(x_in, t.repeat(x_in.shape[0]), conditions, step_cache).float()
        if guidance:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = v_uncond + scales[alive] * (v_cond - v_uncond)
        x = x + velocity * (sigmas[i + 1] - sigmas[i])
        if alive.numel() != batch:
            latents[alive] = x
        else:
            latents = x
        if callback is not None:
            callback(i + 1, schedule.steps, latents)
    return latents
