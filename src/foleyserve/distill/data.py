"""`foleyserve distill prepare`: run the teacher once over a set of clips and store what training needs.

For every clip (a video and its prompt) the encoders run once; the teacher then samples
``seeds_per_clip`` latents at ``teacher_steps`` steps with CFG. Each shard is a safetensors file
holding, per clip ``j``: ``{j}.siglip``, ``{j}.sync``, ``{j}.text``, ``{j}.uncond`` (the
conditioning features), ``{j}.seeds`` (int64), ``{j}.latent`` (the teacher's samples,
``[S, 128, La]`` float32) and ``{j}.states`` (``[G, S, 128, La]``: the teacher's trajectory at the
interior noise levels of every student grid, ``manifest["state_sigmas"]``). The teacher's Euler
path is piecewise linear in sigma, so a state between two of its steps is the exact linear
interpolation of the two; the student grids need not be on the teacher's. The noise is not stored: :func:`~foleyserve.pipeline.sampler.initial_noise`
rebuilds it bit-exactly from the seed, which halves the size on disk. Shard metadata holds the
clips' videos and prompts as JSON.

``manifest.json`` records the options and the plan; a shard is written under a temporary name and
renamed when complete, so an interrupted run resumes at the first missing shard, and a run with
other options into the same folder is refused rather than mixed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from foleyserve.pipeline.sampler import initial_noise

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MANIFEST = "manifest.json"
# Seeds that prepare never hands out: evaluation draws its noise here, so "seeds not used in
# training" holds by construction. It must stay below 2**32: torch's CPU generator (mt19937) keeps
# only a seed's low 32 bits, so 2**40 + k draws the same noise as k (an earlier base did exactly
# that, and "held-out" evaluations ran on training noise).
EVAL_SEED_BASE = 1 << 31


class DataError(ValueError):
    """Input or a data folder that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Clip:
    """One conditioning set: a video (None: text to audio) and its prompt."""

    video: str | None
    prompt: str
    negative_prompt: str = "noisy, harsh"


@dataclass
class PrepareOptions:
    """What ``distill prepare`` does; recorded in the manifest so a resume can check it."""

    teacher: dict  # {"demo": True} or {"model_dir": ..., "model": "xxl"}
    teacher_steps: int = 50
    guidance: float = 4.5
    seeds_per_clip: int = 8
    clips_per_shard: int = 16
    # Student step counts whose grids the stored trajectory states cover (empty: endpoints only).
    student_steps: list[int] = field(default_factory=lambda: [4, 8])
    # Time shift of those grids (flow_match_schedule's; 1: uniform). Above 1 puts the steps closer
    # together at high noise, where the teacher's path bends most.
    student_shift: float = 1.0
    state_dtype: str = "float32"  # "bfloat16" halves the states' size on disk (real data)
    duration: float | None = None  # seconds of each video used (None: up to 15 s)
    seed: int = 0
    clips: list[Clip] = field(default_factory=list)

    def fingerprint(self) -> str:
        d = asdict(self)
        if d["student_shift"] == 1.0:
            del d["student_shift"]  # folders prepared before the option existed still resume
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_inputs(source: Path, *, prompt: str = "", negative_prompt: str = "noisy, harsh") -> list[Clip]:
    """Clips of a folder of videos (each with ``prompt``, or the text of a same-named ``.txt``) or
    of a CSV with columns ``video`` and ``prompt`` (optionally ``negative_prompt``; paths relative
    to the CSV). Raises :class:`DataError` naming what is wrong."""
    if source.is_dir():
        videos = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not videos:
            raise DataError(f"{source} holds no videos ({', '.join(VIDEO_SUFFIXES)}); give a folder of videos or a CSV")
        clips = []
        for v in videos:
            side = v.with_suffix(".txt")
            text = side.read_text().strip() if side.is_file() else prompt
            clips.append(Clip(str(v), text, negative_prompt))
        return clips
    if not source.is_file():
        raise DataError(f"input {source} does not exist; give a folder of videos or a CSV of video,prompt")
    if source.suffix.lower() != ".csv":
        raise DataError(f"input {source} is neither a folder nor a .csv file")
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "video" not in rows[0]:
        raise DataError(f"{source} needs a header with a 'video' column (and 'prompt'); found {list(rows[0]) if rows else 'no rows'}")
    clips = []
    for i, row in enumerate(rows, start=2):
        video = (row.get("video") or "").strip()
        if not video:
            raise DataError(f"{source} line {i}: empty video")
        path = Path(video) if Path(video).is_absolute() else source.parent / video
        if not path.is_file():
            raise DataError(f"{source} line {i}: video {path} does not exist")
        clips.append(Clip(str(path), (row.get("prompt") or prompt).strip(), (row.get("negative_prompt") or negative_prompt).strip()))
    return clips


def state_sigmas(student_steps: list[int], shift: float = 1.0) -> list[float]:
    """The interior noise levels (0 < sigma < 1, descending) of every K-step grid (uniform, or
    with flow_match_schedule's time ``shift``)."""
    if shift == 1.0:
        levels = {round(i / k, 9) for k in student_steps for i in range(1, k)}
    else:
        from foleyserve.pipeline.sampler import flow_match_schedule

        levels = {round(float(x), 9) for k in student_steps for x in flow_match_schedule(k, shift=shift).sigmas[1:-1]}
    return sorted(levels, reverse=True)


class TrajectoryRecorder:
    """A sampler callback keeping the states at ``targets`` sigmas of a ``steps``-step Euler path.

    Call with ``(step, total, latents)`` after each step; :attr:`states` fills in ``targets`` order.
    """

    def __init__(self, teacher_sigmas: torch.Tensor, targets: list[float], noise: torch.Tensor) -> None:
        self.sigmas = teacher_sigmas.double()
        self.targets = list(targets)
        self.prev = noise.float().cpu()
        self.states: list[torch.Tensor] = []

    def __call__(self, step: int, _total: int, latents: torch.Tensor) -> None:
        hi, lo = float(self.sigmas[step - 1]), float(self.sigmas[step])
        cur = latents.float().cpu()
        while len(self.states) < len(self.targets) and lo <= self.targets[len(self.states)] <= hi:
            frac = (hi - self.targets[len(self.states)]) / (hi - lo)
            self.states.append(self.prev + frac * (cur - self.prev))
        self.prev = cur


def clip_seeds(options: PrepareOptions, index: int) -> list[int]:
    """The noise seeds of clip ``index``: distinct across clips, below :data:`EVAL_SEED_BASE`."""
    start = options.seed + index * options.seeds_per_clip
    return list(range(start, start + options.seeds_per_clip))


def check_seed_range(options: PrepareOptions) -> None:
    """Refuse a plan whose seeds would reach the evaluation's (:data:`EVAL_SEED_BASE` up)."""
    last = options.seed + len(options.clips) * options.seeds_per_clip - 1
    if options.seed < 0 or last >= EVAL_SEED_BASE:
        raise DataError(f"seeds {options.seed}..{last} must stay in [0, {EVAL_SEED_BASE}): seeds from {EVAL_SEED_BASE} "
                        "up are the evaluation's; choose a smaller --seed")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def check_out_folder(out: Path, options: PrepareOptions) -> None:
    """Refuse an output folder holding other data (a resume must use the same options)."""
    manifest = out / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("fingerprint") != options.fingerprint():
            raise DataError(
                f"{out} holds data prepared with other options or clips; use a new --out folder (or delete {out})"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no {MANIFEST}; choose an empty or new --out folder")


def prepare(
    engine,
    out: Path,
    options: PrepareOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the teacher (``engine``: an :class:`~foleyserve.pipeline.pipeline.Engine`) over the
    clips and write the shards; returns the manifest (with ``bytes`` on disk).

    Shards already complete in ``out`` are kept (resume).
    """
    from safetensors.torch import save_file

    from foleyserve.pipeline.requests import GenerationRequest

    check_seed_range(options)
    out.mkdir(parents=True, exist_ok=True)
    check_out_folder(out, options)
    n_shards = -(-len(options.clips) // options.clips_per_shard)
    manifest = {
        "format": "foleyserve-distill-data/1",
        "fingerprint": options.fingerprint(),
        "options": asdict(options),
        "shards": [shard_name(i) for i in range(n_shards)],
        "clips": len(options.clips),
        "samples": len(options.clips) * options.seeds_per_clip,
        "state_sigmas": state_sigmas(options.student_steps, options.student_shift),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    done = sum(1 for i in range(n_shards) if (out / shard_name(i)).is_file()) * options.clips_per_shard
    if progress:
        progress(min(done, len(options.clips)), len(options.clips))
    for s in range(n_shards):
        path = out / shard_name(s)
        if path.is_file():
            continue
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        first = s * options.clips_per_shard
        for j, clip in enumerate(options.clips[first : first + options.clips_per_shard]):
            index = first + j
            request = GenerationRequest(
                video=clip.video, prompt=clip.prompt, negative_prompt=clip.negative_prompt,
                steps=options.teacher_steps, guidance=options.guidance, duration=options.duration or None,
            )
            job = engine.prepare(request)
            seeds = clip_seeds(options, index)
            latents, states = _teacher_samples(engine, job, seeds, options)
            tensors.update({
                f"{j}.siglip": job.visual.siglip[0].float().cpu().contiguous(),
                f"{j}.sync": job.visual.sync[0].float().cpu().contiguous(),
                f"{j}.text": job.text.text[0].float().cpu().contiguous(),
                f"{j}.uncond": job.text.uncond[0].float().cpu().contiguous(),
                f"{j}.seeds": torch.tensor(seeds, dtype=torch.int64),
                f"{j}.latent": latents.float().cpu().contiguous(),
                f"{j}.states": states.to(getattr(torch, options.state_dtype)).contiguous(),
            })
            meta.append({**asdict(clip), "index": index, "frames_25fps": job.visual.frames_25fps})
            if progress:
                progress(index + 1, len(options.clips))
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"clips": json.dumps(meta)})
        tmp.replace(path)
    manifest["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return manifest


def _teacher_samples(engine, job, seeds: list[int], options: PrepareOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's samples ``[S, 128, La]`` and trajectory states ``[G, S, 128, La]`` for one clip."""
    from foleyserve.pipeline.sampler import flow_match_schedule, sample_latents

    noise = torch.cat([initial_noise(1, job.latent_length, seed=s) for s in seeds])
    targets = state_sigmas(options.student_steps, options.student_shift)
    recorder = TrajectoryRecorder(flow_match_schedule(options.teacher_steps).sigmas, targets, noise)
    dev = engine.device
    with engine._on_device(engine.components.dit):
        latents = sample_latents(
            engine.components.dit, noise=noise.to(dev), clip_feat=job.visual.siglip, sync_feat=job.visual.sync,
            text_feat=job.text.text, uncond_text_feat=job.text.uncond, steps=options.teacher_steps,
            guidance_scale=options.guidance, callback=recorder,
        )
    shape = (len(targets), *noise.shape)
    states = torch.stack(recorder.states) if targets else torch.zeros(0, *noise.shape)
    assert states.shape == shape, (states.shape, shape)
    return latents.float().cpu(), states


# ------------------------------------------------------------------------------------ reading


@dataclass
class ClipData:
    """One clip of a prepared folder: its features and the teacher's samples."""

    siglip: torch.Tensor  # [Lv, Dc]
    sync: torch.Tensor  # [Ls, Ds]
    text: torch.Tensor  # [Lt, Dt]
    uncond: torch.Tensor  # [Lt, Dt]
    seeds: list[int]
    latent: torch.Tensor  # [S, 128, La]
    states: torch.Tensor  # [G, S, 128, La] at the manifest's state_sigmas
    info: dict
    state_sigmas: list[float] = field(default_factory=list)

    @property
    def latent_length(self) -> int:
        return int(self.latent.shape[-1])

    def noise(self, rows: list[int] | None = None) -> torch.Tensor:
        """The initial noise the teacher started each sample from (rebuilt from the seeds)."""
        seeds = self.seeds if rows is None else [self.seeds[r] for r in rows]
        return torch.cat([initial_noise(1, self.latent_length, seed=s) for s in seeds])

    def path_state(self, sigma: float, rows: list[int], noise: torch.Tensor) -> torch.Tensor:
        """The teacher's state at noise level ``sigma`` for ``rows`` (``noise``: theirs, from :meth:`noise`)."""
        if sigma >= 1.0:
            return noise
        if sigma <= 0.0:
            return self.latent[rows]
        for g, level in enumerate(self.state_sigmas):
            if abs(level - sigma) < 1e-6:
                return self.states[g, rows]
        raise DataError(f"the data holds no teacher states at sigma {sigma:g} (it has {self.state_sigmas}); "
                        "prepare it with --student-steps covering this step count")


def read_manifest(folder: Path) -> dict:
    """The manifest of a prepared folder; :class:`DataError` when it is not one or is incomplete."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared data folder (no {MANIFEST}); run `foleyserve distill prepare` first")
    manifest = json.loads(path.read_text())
    missing = [s for s in manifest["shards"] if not (folder / s).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete ({len(missing)} of {len(manifest['shards'])} shards missing); re-run the same `distill prepare` to finish it")
    return manifest


def iter_clips(folder: Path) -> Iterator[ClipData]:
    """Every clip of a prepared folder, shard by shard (one shard in memory at a time)."""
    from safetensors import safe_open

    manifest = read_manifest(folder)
    sigmas = [float(v) for v in manifest.get("state_sigmas", [])]
    for name in manifest["shards"]:
        with safe_open(str(folder / name), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["clips"])
            for j, info in enumerate(meta):
                get = lambda k: f.get_tensor(f"{j}.{k}")  # noqa: E731
                yield ClipData(get("siglip"), get("sync"), get("text"), get("uncond"), get("seeds").tolist(), get("latent"),
                               get("states").float(), info, sigmas)


def load_clips(folder: Path) -> list[ClipData]:
    """Every clip of a prepared folder in memory (the demo and CI sizes; real data streams)."""
    return list(iter_clips(folder))
