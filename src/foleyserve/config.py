"""Typed engine options, shared by the CLI, the server's deployment profiles and the benchmarks.

:class:`EngineConfig` is a plain dataclass, so it can be built field by field and changed with
:func:`dataclasses.replace` before it is complete (a profile may name no model; a flag adds one
later). Its field types and ranges are checked by pydantic in :meth:`EngineConfig.validate`,
which every consumer calls before it builds anything.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args

import pydantic

PrecisionName = Literal["fp32", "bf16", "fp16", "fp8", "fp8-weight-only"]
OffloadMode = Literal["none", "stage", "sequential"]
ModelSize = Literal["xxl", "xl"]
PRECISION_NAMES: tuple[str, ...] = get_args(PrecisionName)
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)
MODEL_SIZES: tuple[str, ...] = get_args(ModelSize)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

# Pixels per frame one local run decodes (the server has its own max_video_pixels). Decoding
# converts one full-resolution frame at a time, so this bounds a run's host memory; 4K fits.
MAX_VIDEO_PIXELS = 4096 * 2304


# The demo's defaults live here, not in pipeline/demo.py, so the CLI's help can state them without
# importing the models (seconds of start-up).
DEMO_STEPS = 25  # the toy model converges long before the real model's 50
DEMO_PROMPT = "a ball bouncing on a wooden floor"


class ConfigError(ValueError):
    """A profile or option value that cannot be used; the message names the key and the choices."""


@dataclass
class EngineConfig:
    """How to build an :class:`~foleyserve.pipeline.pipeline.Engine`.

    Either ``model_dir`` (the official weights folder) or ``demo=True`` (the tiny random-weight
    model) is required. The other fields are the cost options described in the README:
    ``precision`` (``fp32``, ``bf16``, ``fp16``, ``fp8``, ``fp8-weight-only``), ``step_cache`` (a
    threshold >= 0, or None for exact), ``compile``, ``offload`` (``none``, ``stage``,
    ``sequential``), ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``). Call :meth:`validate`
    (``Engine.from_config`` does) to check every field.
    """

    model_dir: Path | None = None
    demo: bool = False
    model: ModelSize = "xxl"
    precision: PrecisionName = "bf16"
    device: str = "auto"
    # Layers kept in fp32 under a low-precision policy (name patterns, see foleyserve.precision);
    # None = the policy's default list.
    keep_fp32: list[str] | None = None
    step_cache: Annotated[float, pydantic.Field(ge=0)] | None = None  # threshold; None = off (exact)
    compile: bool = False
    # With compile: a file of saved compile artifacts (loaded at start, rewritten after warm-up),
    # and how many shape buckets keep a compiled step / captured CUDA graph.
    compile_cache: Path | None = None
    max_graphs: Annotated[int, pydantic.Field(ge=1, strict=True)] = 8
    offload: OffloadMode = "none"
    siglip_dir: Path | None = None
    clap_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> "EngineConfig":
        """Check every field and the combinations; returns the config with paths as ``Path``.

        Raises :class:`ConfigError` naming the field, the value and the allowed choices.
        """
        try:
            checked = _ADAPTER.validate_python({f.name: getattr(self, f.name) for f in fields(self)})
        except pydantic.ValidationError as e:
            raise ConfigError(_describe(e)) from None
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if not self.demo and self.model_dir is None:
            raise ConfigError("no model given: set model_dir (the official weights) or demo: true")
        if self.compile and self.offload == "sequential":
            raise ConfigError(
                "compile and offload=sequential do not combine (streamed blocks change weights under the graph); pick one"
            )
        return checked

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from a mapping (a profile's ``engine:`` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        v = dict(values)
        for key in ("model_dir", "siglip_dir", "clap_dir", "compile_cache"):
            if v.get(key) is not None:
                v[key] = Path(v[key])
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), the inverse of :meth:`from_dict`."""
        d = asdict(self)
        d.pop("extra")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


_ADAPTER = pydantic.TypeAdapter(EngineConfig)

# How a Literal field's value is named in errors: "unknown offload mode 'disk'".
_FIELD_NOUNS = {"precision": "precision", "offload": "offload mode", "model": "model"}
_FIELD_CHOICES = {"precision": PRECISION_NAMES, "offload": OFFLOAD_MODES, "model": MODEL_SIZES}


def _describe(error: pydantic.ValidationError) -> str:
    """pydantic's errors as one sentence in this project's style (field, value, what is allowed)."""
    parts = []
    for item in error.errors(include_url=False):
        name = str(item["loc"][0]) if item["loc"] else "value"
        value = item.get("input")
        if name in _FIELD_CHOICES and item["type"] == "literal_error":
            parts.append(f"unknown {_FIELD_NOUNS[name]} {value!r}: choose one of {', '.join(_FIELD_CHOICES[name])}")
        elif name == "step_cache":
            parts.append(f"step_cache must be a threshold >= 0 or null, got {value!r}")
        elif name == "max_graphs":
            parts.append(f"max_graphs must be a whole number >= 1, got {value!r}")
        else:
            parts.append(f"{name}: {item['msg'].lower()}, got {value!r}")
    # A union (e.g. float | None) reports one error per member; say each thing once.
    return "; ".join(dict.fromkeys(parts))
