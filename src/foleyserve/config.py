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
BackendName = Literal["torch", "onnxruntime", "tensorrt"]
EncoderPrecision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_NAMES: tuple[str, ...] = get_args(PrecisionName)
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)
MODEL_SIZES: tuple[str, ...] = get_args(ModelSize)
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
# The stages an exported runtime can take over (foleyserve.export.stages maps them to graphs).
ENCODER_STAGES = ("siglip", "synchformer", "clap")
BACKEND_STAGES = (*ENCODER_STAGES, "dit", "dac")
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
    # Exported runtimes (issue 11): which runtime runs the exported stages, the export folder
    # (``foleyserve export``), and which stages use it (None = every stage the folder has).
    backend: BackendName = "torch"
    export_dir: Path | None = None
    backend_stages: list[str] | None = None
    # The three encoders (SigLIP2, Synchformer, CLAP): "auto" is the official handling (SigLIP2 and
    # CLAP fp32, Synchformer under fp16 autocast on CUDA with a low-precision policy); fp32, bf16 or
    # fp16 runs all three so (autocast), on any device. Once the denoiser is a 4-step student the
    # encoders are most of a clip's cost, which is what bf16 here is for.
    encoder_precision: EncoderPrecision = "auto"
    # Turbo tier (issue 12): a distilled few-step student denoiser and a light DAC decoder.
    student: Path | None = None
    light_decoder: Path | None = None
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
        if self.backend != "torch":
            if self.export_dir is None:
                raise ConfigError(f"backend {self.backend} needs export_dir (--export-dir): the folder `foleyserve export` wrote")
            # Exported graphs carry their own precision (fp32, or int8 from `export --int8`) and
            # hold their weights outside torch, where no policy, offload or compile reaches them.
            dit_exported = self.backend_stages is None or "dit" in self.backend_stages
            if dit_exported and self.precision != "fp32":
                raise ConfigError(f"backend {self.backend} runs the graphs' own precision: set precision fp32 "
                                  f"(use an --int8 export for INT8), not {self.precision}")
            if self.offload != "none" or self.compile:
                raise ConfigError(f"backend {self.backend} does not combine with offload or compile: set offload none, compile off")
            # Exports are of the official networks; a distilled student or light decoder would run
            # the teacher's graphs without any error, so those stages stay in torch.
            dac_exported = self.backend_stages is None or "dac" in self.backend_stages
            encoders = [e for e in ENCODER_STAGES if self.backend_stages is None or e in self.backend_stages]
            if encoders and self.encoder_precision not in ("auto", "fp32"):
                raise ConfigError(f"encoder_precision {self.encoder_precision} does not reach exported encoders ({', '.join(encoders)}), "
                                  "which run the graphs' own precision: leave them out of backend_stages, or use an --int8 export")
            if (self.student is not None and dit_exported) or (self.light_decoder is not None and dac_exported):
                raise ConfigError("the turbo student and light decoder run in torch: with backend "
                                  f"{self.backend}, set backend_stages (--backend-stages) to leave out dit and dac")
        if self.backend_stages is not None:
            unknown = [s for s in self.backend_stages if s not in BACKEND_STAGES]
            if unknown or not self.backend_stages:
                raise ConfigError(f"backend_stages {self.backend_stages!r}: choose from {', '.join(BACKEND_STAGES)}")
        return checked

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from a mapping (a profile's ``engine:`` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        v = dict(values)
        for key in ("model_dir", "siglip_dir", "clap_dir", "compile_cache", "export_dir", "student", "light_decoder"):
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
_FIELD_NOUNS = {"precision": "precision", "offload": "offload mode", "model": "model", "backend": "backend",
                "encoder_precision": "encoder precision"}
_FIELD_CHOICES = {"precision": PRECISION_NAMES, "offload": OFFLOAD_MODES, "model": MODEL_SIZES, "backend": BACKEND_NAMES,
                  "encoder_precision": get_args(EncoderPrecision)}


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
