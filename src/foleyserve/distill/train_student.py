"""Training the K-step student: piecewise rectified flow (PeRFlow) on the teacher's CFG trajectories.

The time axis is cut into the K windows of the student's uniform grid. In window k the teacher's
guided ODE goes from state ``a`` (at sigma_k) to state ``b`` (at sigma_k+1); the student learns the
straight line between them: at ``x = a + u (b - a)`` and ``sigma = sigma_k + u (sigma_k+1 - sigma_k)``
its velocity target is the chord ``(b - a) / (sigma_k+1 - sigma_k)``. One Euler step per window then
lands where the teacher's 50 guided steps land, one model call per step and no CFG. ``u`` is 0 (the
window start, where sampling evaluates) with probability ``start_fraction``, else uniform in [0, 1).

The student starts as a copy of the teacher (same architecture and keys) and is trained in fp32
weights (bf16 autocast on a GPU), with optional gradient checkpointing per block and an EMA copy,
which is what is saved.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from foleyserve.distill.data import ClipData, iter_clips, read_manifest
from foleyserve.distill.loop import end_iteration, update_ema
from foleyserve.distill.student import StudentRecipe, save_student
from foleyserve.models.dit import DiTConditions, FoleyDiT
from foleyserve.pipeline.sampler import flow_match_schedule

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class StudentTrainOptions:
    """Options of one student run (recorded in its checkpoint's recipe)."""

    steps: int = 4  # K: the student's step count
    shift: float = 1.0  # time shift of its grid: the data's (``distill prepare --student-shift``)
    iterations: int = 1000
    batch_size: int = 8  # rows per iteration (seeds of one clip share its features)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 50
    ema_decay: float = 0.99
    start_fraction: float = 0.5
    # Share of rows drawn from the first window (sigma 1 down); None: every window equally. On the
    # demo teacher nearly all of a student's final error is made in that window (``distill eval``'s
    # per-step errors), so its iterations are worth more there.
    first_window_share: float | None = None
    # End-to-end term (direct distillation, Luhman & Luhman 2021): the student's own K-step sample
    # from the teacher's noise against the teacher's sample, relative MSE, from iteration
    # ``rollout_start`` on. It costs K more forward/backward passes per iteration and corrects
    # what the per-window targets cannot see: a window's error carried through the later ones.
    rollout_weight: float = 0.0
    rollout_start: int = 0
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    bf16: bool = True  # autocast on CUDA; CPU trains in fp32
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)


class ClipStream:
    """Clips of a prepared folder in a seeded random order, one shard in memory at a time."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.rng = random.Random(seed)
        self.manifest = read_manifest(folder)
        self._buffer: list[ClipData] = []
        # The demo and CI folders fit in memory; keep them instead of re-reading every epoch.
        self._all: list[ClipData] | None = list(iter_clips(folder)) if len(self.manifest["shards"]) <= 4 else None

    def __iter__(self):
        while True:
            if self._all is not None:
                order = list(self._all)
                self.rng.shuffle(order)
                yield from order
                continue
            for clip in iter_clips(self.folder):  # shard order fixed; clips shuffled inside a window of one shard
                self._buffer.append(clip)
                if len(self._buffer) >= 16:
                    self.rng.shuffle(self._buffer)
                    yield from self._buffer
                    self._buffer = []


def checkpointed_rest_blocks(dit: FoleyDiT) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DiTConditions], torch.Tensor]:
    """``FoleyDiT.rest_blocks`` with each block recomputed in the backward pass (activation memory
    of one block instead of all: what lets XXL train at 10 s clips on one 80 GB GPU)."""

    def run(audio: torch.Tensor, visual: torch.Tensor, vec: torch.Tensor, c: DiTConditions) -> torch.Tensor:
        n = len(dit.triple_blocks)
        for i in range(1, n):
            audio, visual = checkpoint(dit.triple_blocks[i], audio, visual, vec, c, c.text_kv[i], last=i == n - 1, use_reentrant=False)
        if c.sync_tokens is not None and c.sync_index is not None:
            mod_in, index = c.sync_tokens + vec.unsqueeze(1), c.sync_index
        else:
            mod_in, index = c.add_sync + vec.unsqueeze(1), None
        mod_in = mod_in.to(dit.compute_dtype)
        for block in dit.single_blocks:
            audio = checkpoint(block, audio, mod_in, c.rope_audio, index, use_reentrant=False)
        return audio

    return run


def window_batch(clip: ClipData, rows: list[int], steps: int, start_fraction: float, gen: torch.Generator,
                 first_window_share: float | None = None, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PeRFlow inputs for ``rows`` of one clip: ``(x, sigma [B], target velocity)``."""
    grid = flow_match_schedule(steps, shift=shift).sigmas
    b = len(rows)
    if first_window_share is None or steps == 1:
        k = torch.randint(0, steps, (b,), generator=gen)
    else:
        weights = torch.full((steps,), (1 - first_window_share) / (steps - 1))
        weights[0] = first_window_share
        k = torch.multinomial(weights, b, replacement=True, generator=gen)
    u = torch.rand(b, generator=gen) * (torch.rand(b, generator=gen) >= start_fraction)
    noise = clip.noise(rows)
    xs, targets, sigmas = [], [], []
    for i, r in enumerate(rows):
        s0, s1 = float(grid[k[i]]), float(grid[k[i] + 1])
        a = clip.path_state(s0, [r], noise[i : i + 1])
        e = clip.path_state(s1, [r], noise[i : i + 1])
        xs.append(a + float(u[i]) * (e - a))
        targets.append((e - a) / (s1 - s0))
        sigmas.append(s0 + float(u[i]) * (s1 - s0))
    return torch.cat(xs), torch.tensor(sigmas, dtype=torch.float32), torch.cat(targets)


def student_loss(student: FoleyDiT, clip: ClipData, rows: list[int], opts: StudentTrainOptions, gen: torch.Generator,
                 device: torch.device, *, rollout: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error of the student's velocity against the window chords, plus (``rollout``)
    ``opts.rollout_weight`` times the relative error of its K-step sample; returns the loss and
    its parts for the log."""
    x, sigma, target = window_batch(clip, rows, opts.steps, opts.start_fraction, gen, opts.first_window_share, opts.shift)
    b = len(rows)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and opts.bf16 else torch.autocast("cpu", enabled=False)
    with autocast:
        c = student.prepare_conditions(
            clip_feat=clip.siglip[None].expand(b, -1, -1).to(device), sync_feat=clip.sync[None].expand(b, -1, -1).to(device),
            cond=clip.text[None].expand(b, -1, -1).to(device), audio_len=clip.latent_length,
        )
        parts = (student.first_block, checkpointed_rest_blocks(student), student.head) if opts.grad_checkpointing else None
        v = student.predict_flow(x.to(device), (sigma * 1000).to(device), c, parts=parts)
        window = (v.float() - target.to(device)).pow(2).mean()
        if not rollout or opts.rollout_weight <= 0:
            return window, {"window": window.item()}
        sample = _student_sample(student, clip.noise(rows).to(device), c, opts.steps, parts, opts.shift)
    teacher = clip.latent[rows].to(device)
    end = (sample - teacher).pow(2).mean() / teacher.pow(2).mean()
    return window + opts.rollout_weight * end, {"window": window.item(), "rollout_rel_l2": end.sqrt().item()}


def _student_sample(student: FoleyDiT, noise: torch.Tensor, c: DiTConditions, steps: int, parts, shift: float = 1.0) -> torch.Tensor:
    """The sampler's Euler loop on the student's grid, with gradients (float32 state)."""
    grid = flow_match_schedule(steps, shift=shift).sigmas.tolist()
    x = noise.float()
    for k in range(steps):
        t = torch.full((x.shape[0],), grid[k] * 1000.0, device=x.device)
        x = x + (grid[k + 1] - grid[k]) * student.predict_flow(x, t, c, parts=parts).float()
    return x


def _lr_at(opts: StudentTrainOptions, it: int) -> float:
    # Linear warm-up, then cosine to a tenth: the usual fine-tuning schedule.
    if it < opts.warmup:
        return opts.lr * (it + 1) / opts.warmup
    frac = (it - opts.warmup) / max(1, opts.iterations - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_student(
    teacher: FoleyDiT,
    data: Path,
    out: Path,
    opts: StudentTrainOptions,
    *,
    teacher_info: dict,
    guidance: float,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train (or resume, from ``out/train_state.pt``) a K-step student; returns the student file.

    ``teacher`` must be the unfused training layout (as loaded, before ``fuse_for_inference``).
    Writes ``out/student-k{K}.safetensors`` (EMA weights) at every checkpoint and at the end, the
    resumable state, and one JSON line per logged iteration to ``out/train_log.jsonl``.
    """
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    student = copy.deepcopy(teacher).float().to(device).train()
    for p in student.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(student).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optim = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(opts.seed)
    state_path = out / STATE_FILE
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["options"]["steps"] != opts.steps:
            raise ValueError(f"{state_path} is a {state['options']['steps']}-step run; use another --out for {opts.steps} steps")
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optim"])
        gen.set_state(state["generator"])
        start = int(state["iteration"])
    stream = iter(ClipStream(data, opts.seed + start))
    manifest = read_manifest(data)
    recipe = StudentRecipe(
        steps=opts.steps, trained_steps=(opts.steps,), distilled_guidance=guidance, shift=opts.shift,
        model_kwargs=_model_kwargs(teacher), teacher=teacher_info,
        method=f"PeRFlow: piecewise rectified flow on the teacher's {manifest['options']['teacher_steps']}-step CFG trajectories, {opts.steps} windows",
        training={**asdict(opts), "data": str(data), "samples": manifest["samples"]},
    )
    target = out / f"student-k{opts.steps}.safetensors"

    def save(it: int) -> None:
        torch.save({"student": student.state_dict(), "ema": ema.state_dict(), "optim": optim.state_dict(),
                    "generator": gen.get_state(), "iteration": it, "options": asdict(opts)}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        save_student(target, ema, recipe)

    log = (out / LOG_FILE).open("a")
    t0 = time.perf_counter()
    for it in range(start, opts.iterations):
        clip = next(stream)
        n = len(clip.seeds)
        rows = sorted(random.Random(opts.seed * 1_000_003 + it).sample(range(n), min(opts.batch_size, n)))
        for g in optim.param_groups:
            g["lr"] = _lr_at(opts, it)
        loss, parts = student_loss(student, clip, rows, opts, gen, device, rollout=it >= opts.rollout_start)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), opts.grad_clip)
        optim.step()
        update_ema(ema, student, it, opts.ema_decay)
        record = {"iteration": it + 1, "loss": round(loss.item(), 6), **{k: round(v, 6) for k, v in parts.items()},
                  "grad_norm": round(grad_norm.item(), 4),
                  "lr": optim.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)}
        end_iteration(it, opts.iterations, record, log=log, log_every=opts.log_every, checkpoint_every=opts.checkpoint_every,
                      save=save, progress=progress)
    log.close()
    save(opts.iterations)
    return target


def _model_kwargs(dit: FoleyDiT) -> dict:
    cfg = dit.config
    kwargs = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "ignored"}
    return {**cfg.ignored, **kwargs}
