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
from typing import Callable, Protocol

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
    """Seeded float32 noise ``[batch, channels, length]``, identical on every device.

    Seeds below 2**32 draw exactly the official noise (torch's CPU generator). That generator keeps
    only a seed's low 32 bits, so for larger seeds (requests take up to 2**63 - 1) the noise comes
    from NumPy's PCG64, which takes all 64: distinct seeds give distinct audio.
    """
    if seed >= 2**32:
        import numpy as np

        rng = np.random.Generator(np.random.PCG64(seed))
        return torch.from_numpy(rng.standard_normal((batch, channels, length), dtype=np.float32)).to(device)
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


def euler_cfg_step(
    predict: Callable[[torch.Tensor, torch.Tensor, DiTConditions], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    dsigma: torch.Tensor,
    conditions: DiTConditions,
    scales: torch.Tensor,
    guidance: bool,
) -> torch.Tensor:
    """One denoising step: the CFG pair in one model call, the guided velocity, the Euler update.

    ``t`` and ``dsigma`` are 0-d device tensors and ``scales`` is ``[B, 1, 1]``, so the step is pure
    tensor work: it makes no host sync and compiles (or is captured) as one graph.
    """
    x_in = torch.cat((x, x), 0) if guidance else x
    velocity = predict(x_in, t.expand(x_in.shape[0]), conditions).float()
    if guidance:
        v_uncond, v_cond = velocity.chunk(2)
        velocity = v_uncond + scales * (v_cond - v_uncond)
    return x + velocity * dsigma


class StepRunner(Protocol):
    """Runs :func:`euler_cfg_step` for a sampler (``pipeline/stepgraph.py``: compiled, CUDA graphs)."""

    def begin(self, dit: FoleyDiT, conditions: DiTConditions, scales: torch.Tensor, guidance: bool, step_cache: StepCache | None) -> None: ...

    def step(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor: ...


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
    runner: StepRunner | None = None,
) -> torch.Tensor:
    """Run the official denoising loop and return the final latents ``[B, 128, La]`` (float32).

    Features may have batch 1 (shared by every noise row, as the official ``batch_size`` option
    does) or the noise's batch. ``callback(step, total, latents)`` is called after every step.

    Batching several requests: ``guidance_scale`` may give one scale per row (all above 1, or all
    at most 1: guidance on or off is one batch layout), ``text_lengths`` the real prompt length of
    each row when the text features were padded to a common length. ``keep_rows`` is asked before
    each step; rows it reports False stop being computed (their returned latents are meaningless).
    ``step_cache`` skips blocks on rows that change slowly (see :mod:`.stepcache`).

    ``runner`` (see :mod:`.stepgraph`) runs each step as one compiled graph; cancelled rows then
    keep being computed (the graph's shape is fixed) and are dropped from the result. Without a
    step cache the loop makes no host sync: the schedule lives on the device and cancellation is
    decided from host-side state.
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
    dev = dit.device
    latents = noise.to(device=dev, dtype=torch.float32).clone()
    scales = scales.to(dev).view(batch, 1, 1)
    # The whole schedule goes to the device once; each step reads 0-d views of it.
    timesteps = schedule.timesteps.to(dev)
    dsigmas = (schedule.sigmas[1:] - schedule.sigmas[:-1]).to(dev)
    alive = list(range(batch))  # rows still computed (host-side: cancellation never syncs)
    if runner is not None:
        runner.begin(dit, conditions, scales, guidance, step_cache)

    def predict(x_in: torch.Tensor, t_in: torch.Tensor, c: DiTConditions) -> torch.Tensor:
        return dit.predict_flow(x_in, t_in, c, step_cache)

    for i in range(schedule.steps):
        if keep_rows is not None:
            wanted = keep_rows()
            if wanted is not None:
                keep = [r for r in alive if wanted[r]]
                if not keep:
                    break
                if runner is None and len(keep) != len(alive):
                    local = [alive.index(r) for r in keep]
                    rows = local + [j + len(alive) for j in local] if guidance else local
                    conditions = conditions.select(rows)
                    if step_cache is not None:
                        step_cache.select(rows)
                    alive = keep
        if runner is not None:
            latents = runner.step(latents, timesteps[i], dsigmas[i])
        else:
            full = len(alive) == batch
            index = None if full else torch.tensor(alive, device=dev)
            x = latents if full else latents[index]
            with _autocast_for(dit):
                x = euler_cfg_step(predict, x, timesteps[i], dsigmas[i], conditions, scales if full else scales[index], guidance)
            if full:
                latents = x
            else:
                latents[index] = x
        if callback is not None:
            callback(i + 1, schedule.steps, latents)
    # A runner's output is its static buffer, which the next request overwrites.
    return latents.clone() if runner is not None else latents
