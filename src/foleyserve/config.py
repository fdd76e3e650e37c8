"""Typed engine options, shared by the CLI, the server's deployment profiles and the benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

PRECISION_NAMES = ("fp32", "bf16", "fp16", "fp8", "fp8-weight-only")
OFFLOAD_MODES = ("none", "stage", "sequential")
MODEL_SIZES = ("xxl", "xl")


class ConfigError(ValueError):
    """A profile or option value that cannot be used; the message names the key and the choices."""


@dataclass
class EngineConfig:
    """How to build an :class:`~foleyserve.pipeline.pipeline.Engine`.

    ``model_dir`` None with ``demo`` True gives the tiny random-weight demo model.
    """

    model_dir: Path | None = None
    demo: bool = False
    model: str = "xxl"
    precision: str = "bf16"
    device: str = "auto"
    # Layers kept in fp32 under a low-precision policy (name patterns, see foleyserve.precision);
    # None = the policy's default list.
    keep_fp32: list[str] | None = None
    step_cache: float | None = None  # threshold; None = off (exact)
    compile: bool = False
    # With compile: a file of saved compile artifacts (loaded at start, rewritten after warm-up),
    # and how many shape buckets keep a compiled step / captured CUDA graph.
    compile_cache: Path | None = None
    max_graphs: int = 8
    offload: str = "none"
    siglip_dir: Path | None = None
    clap_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> "EngineConfig":
        if self.precision not in PRECISION_NAMES:
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISION_NAMES)}")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"unknown offload mode {self.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
        if self.model not in MODEL_SIZES:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(MODEL_SIZES)}")
        if self.step_cache is not None and not float(self.step_cache) >= 0:
            raise ConfigError(f"step_cache must be a threshold >= 0 or null, got {self.step_cache!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ConfigError(f"max_graphs must be a whole number >= 1, got {self.max_graphs!r}")
        if not self.demo and self.model_dir is None:
            raise ConfigError("no model given: set model_dir (the official weights) or demo: true")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineConfig":
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
        d = asdict(self)
        d.pop("extra")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
