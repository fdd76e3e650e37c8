"""The distilled student denoiser: its checkpoint format, sampling recipe and loader.

A student has the teacher's architecture (:class:`~foleyserve.models.dit.FoleyDiT`), so its file
holds every official DiT key, in the official (unfused) layout, at the official names: anything
that reads a HunyuanVideo-Foley denoiser checkpoint reads the student's weights. Next to them it
has keys of its own, under ``student.``:

* ``student.sigmas.k<K>``: the noise levels it samples at for each step count K it was trained
  for (float32, K + 1 values from 1 to 0);

and its recipe as JSON in the safetensors metadata (``foleyserve.student``): the default step
count, the step counts trained, the guidance scale distilled in, the method and the teacher. The
guidance scale is distilled in as a fixed value (no guidance embedding): the student samples
without classifier-free guidance, one model call per step, and a request's guidance scale does
not apply to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from foleyserve.config import ConfigError
from foleyserve.models.dit import FoleyDiT, build_dit
from foleyserve.pipeline.sampler import flow_match_schedule

FORMAT = "foleyserve-student/1"
META_KEY = "foleyserve.student"
OWN_PREFIX = "student."


class StudentError(ConfigError):
    """A student file that cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class StudentRecipe:
    """How a student samples, recorded in its checkpoint.

    ``steps`` is the default step count (what the engine uses); ``trained_steps`` every step count
    it was trained for; ``distilled_guidance`` the teacher's CFG scale it reproduces without CFG.
    """

    steps: int
    trained_steps: tuple[int, ...]
    distilled_guidance: float
    model_kwargs: dict[str, Any]
    shift: float = 1.0
    method: str = "rectified-flow distillation on teacher noise-sample pairs, K-step grid"
    teacher: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The student's noise levels for ``steps`` (default: its own), float32 ``[K + 1]``."""
        return flow_match_schedule(self.steps if steps is None else steps, shift=self.shift).sigmas

    def to_json(self) -> str:
        d = asdict(self)
        d["trained_steps"] = list(self.trained_steps)
        return json.dumps({"format": FORMAT, **d}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "student") -> "StudentRecipe":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise StudentError(f"{where}: the recorded recipe is not valid JSON ({e}); re-run `foleyserve distill train`") from None
        if d.pop("format", None) != FORMAT:
            raise StudentError(f"{where} is not a {FORMAT} checkpoint; make one with `foleyserve distill train`")
        try:
            d["trained_steps"] = tuple(int(k) for k in d["trained_steps"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise StudentError(f"{where}: incomplete recipe ({e}); re-run `foleyserve distill train`") from None


def official_state_dict(dit: FoleyDiT) -> dict[str, torch.Tensor]:
    """The DiT's weights at the official key layout (refuses a model fused for inference)."""
    sd = dit.state_dict()
    fused = [k for k in sd if ".w13." in k or k.endswith(".taps")]
    if fused:
        raise ValueError("this DiT was fused for inference (fuse_for_inference); save the training copy instead")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_student(path: str | Path, dit: FoleyDiT, recipe: StudentRecipe, *, dtype: torch.dtype | None = None) -> Path:
    """Write a student checkpoint: official keys, ``student.`` keys, the recipe in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu() for k, v in official_state_dict(dit).items()}
    for k in sorted(set(recipe.trained_steps) | {recipe.steps}):
        tensors[f"{OWN_PREFIX}sigmas.k{k}"] = recipe.sigmas(k).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: recipe.to_json()})
    tmp.replace(path)  # a crash mid-write never leaves a half file under the real name
    return path


def read_recipe(path: str | Path) -> StudentRecipe:
    """The recipe of a student file, without loading its weights (for checks before loading)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StudentError(f"student {path} does not exist; make one with `foleyserve distill train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise StudentError(f"student {path} is not a safetensors file ({e})") from None
    if META_KEY not in meta:
        raise StudentError(f"{path} has no student recipe: it is not a student checkpoint (make one with `foleyserve distill train`)")
    return StudentRecipe.from_json(meta[META_KEY], str(path))


def load_student(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expect_kwargs: Mapping[str, Any] | None = None,
) -> tuple[FoleyDiT, StudentRecipe]:
    """Build the student DiT from its file, in the official (unfused) layout, and its recipe.

    ``expect_kwargs`` (the engine's teacher config) makes a student of another architecture an
    error rather than a silent swap: it would need other encoders' feature sizes.
    """
    from safetensors.torch import load_file

    recipe = read_recipe(path)
    if expect_kwargs is not None:
        keys = ("hidden_size", "depth_triple_blocks", "depth_single_blocks", "clip_dim", "sync_feat_dim", "condition_dim")
        diff = [k for k in keys if recipe.model_kwargs.get(k) != expect_kwargs.get(k)]
        if diff:
            raise StudentError(
                f"student {path} was distilled from another model ({', '.join(f'{k} {recipe.model_kwargs.get(k)} vs {expect_kwargs.get(k)}' for k in diff)}); "
                "use it with the teacher it was trained from"
            )
    sd = load_file(str(path))
    own = {k for k in sd if k.startswith(OWN_PREFIX)}
    dit = build_dit(recipe.model_kwargs, dtype=dtype, device="meta")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k not in own}
    expected = set(dit.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise StudentError(f"student {path} does not fit its recorded architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dit.load_state_dict(weights, strict=True, assign=True)
    return dit.to(device).eval(), recipe


def with_recipe(request: Any, recipe: StudentRecipe) -> Any:
    """A request as the student runs it: its step count, guidance off (distilled in)."""
    return replace(request, steps=recipe.steps, guidance=1.0)
