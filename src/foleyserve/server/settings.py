"""Server options and deployment profiles.

A profile is a YAML file with two top-level sections, ``engine:`` (the :class:`EngineConfig`
fields) and ``server:`` (the :class:`ServerConfig` fields). The shipped profiles live in
``foleyserve/profiles/`` inside the package (so they survive ``pip install``) and, for people
reading the repository, in ``profiles/`` at its root; a checkout's root copy wins so an edit
there takes effect without reinstalling.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from foleyserve.config import ConfigError, EngineConfig

PRIORITIES = ("interactive", "bulk")
CACHE_MODES = ("off", "memory", "disk")
LENGTH_BUCKETS = ("exact", "second")  # see foleyserve.runtime.batcher
PROFILE_SECTIONS = ("engine", "server")
API_KEY_ENV = "FOLEYSERVE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServerConfig:
    """How the HTTP service runs. Every field can be set in a profile's ``server:`` section."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the chosen one is printed)
    data_dir: Path = Path("foleyserve-data")  # jobs.sqlite3, uploads/, results/, cache/
    log_level: str = "info"
    # Request limits. Decoding keeps full-resolution frames in memory (about 500 of them for a
    # 15 s clip), so the pixel limit is what bounds a request's host memory, not the upload size.
    max_upload_mb: float = 200.0
    max_video_pixels: int = 1920 * 1088
    # Uploads are refused (507) while the data directory has less free space than this, so a
    # filling disk stops new work before it breaks running jobs' result writes.
    min_free_mb: float = 100.0
    max_prompt_chars: int = 2000
    max_steps: int = 1000  # the engine's own range; a profile can cap it (cost grows with steps)
    # Defaults for fields a request leaves out.
    default_steps: int = 50
    default_guidance: float = 4.5
    default_priority: str = "interactive"
    # Batcher (see foleyserve.runtime.batcher.BatcherConfig).
    max_batch_size: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 64
    length_bucket: str = "exact"
    # Feature and result cache: off, memory, disk or redis://host:port/db.
    cache: str = "disk"
    cache_dir: Path | None = None  # None: <data_dir>/cache
    cache_max_gb: float = 2.0
    cache_memory_mb: float = 256.0
    # Access. The key is better passed through the FOLEYSERVE_API_KEY environment variable than
    # written into a profile.
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    metrics_public: bool = True
    # Result retention: finished jobs' files are deleted past this age or when the results
    # together pass this size (oldest first); None disables that limit.
    retention_hours: float | None = 24.0
    retention_max_gb: float | None = 10.0
    retention_interval_s: float = 60.0
    # On shutdown the running batch may finish within this many seconds; after that it is cut
    # short and re-runs on the next start (its upload is kept).
    shutdown_grace_s: float = 10.0
    # With engine.compile: the clip lengths (seconds) and batch sizes whose denoising step is
    # compiled (and on CUDA captured) before /readyz turns 200, so no user pays a compile.
    # Pair it with length_bucket: second, which keeps every request inside these buckets.
    warmup_seconds: list[float] = field(default_factory=list)
    warmup_batch_sizes: list[int] = field(default_factory=lambda: [1])

    # -- derived -------------------------------------------------------------------------------

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.data_dir) / "cache"

    # -- checks and conversion -------------------------------------------------------------------

    def validate(self) -> "ServerConfig":
        _check_int(self, "port", 0, 65535)  # 0: any free port
        _check_number(self, "max_upload_mb", 0.001, None)
        _check_int(self, "max_video_pixels", 1, None)
        _check_number(self, "min_free_mb", 0.0, None)
        _check_int(self, "max_prompt_chars", 1, None)
        _check_int(self, "max_steps", 1, 1000)
        _check_int(self, "default_steps", 1, self.max_steps if isinstance(self.max_steps, int) else 1000)
        _check_number(self, "default_guidance", 0.0, 100.0)
        _check_choice(self, "default_priority", PRIORITIES)
        _check_choice(self, "log_level", LOG_LEVELS)
        _check_int(self, "max_batch_size", 1, 256)
        _check_number(self, "max_wait_ms", 0.0, 60_000.0)
        _check_int(self, "max_queue", 1, None)
        _check_choice(self, "length_bucket", LENGTH_BUCKETS)
        if not isinstance(self.cache, str) or not (self.cache in CACHE_MODES or self.cache.startswith(("redis://", "rediss://"))):
            raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)} or a redis://host:port/db URL, got {self.cache!r}")
        _check_number(self, "cache_max_gb", 0.0, None)
        _check_number(self, "cache_memory_mb", 0.0, None)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigError("api_key must be a non-empty string, or null for no authentication")
        if not isinstance(self.cors_origins, list) or not all(isinstance(o, str) and o for o in self.cors_origins):
            raise ConfigError(f"cors_origins must be a list of origins like 'https://example.com', got {self.cors_origins!r}")
        if not isinstance(self.metrics_public, bool):
            raise ConfigError(f"metrics_public must be true or false, got {self.metrics_public!r}")
        if self.retention_hours is not None:
            _check_number(self, "retention_hours", 0.0, None)
        if self.retention_max_gb is not None:
            _check_number(self, "retention_max_gb", 0.0, None)
        _check_number(self, "retention_interval_s", 0.1, None)
        _check_number(self, "shutdown_grace_s", 0.0, None)
        if not isinstance(self.warmup_seconds, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0.64 <= x <= 15.04 for x in self.warmup_seconds
        ):
            raise ConfigError(f"warmup_seconds must be a list of clip lengths between 0.64 and 15.04 s, got {self.warmup_seconds!r}")
        if not isinstance(self.warmup_batch_sizes, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 256 for b in self.warmup_batch_sizes
        ):
            raise ConfigError(f"warmup_batch_sizes must be a list of whole numbers 1-256, got {self.warmup_batch_sizes!r}")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ServerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown server option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        v = dict(values)
        for key in ("data_dir", "cache_dir"):
            if v.get(key) is not None:
                v[key] = Path(str(v[key]))
        if isinstance(v.get("cors_origins"), str):
            v["cors_origins"] = [o.strip() for o in v["cors_origins"].split(",") if o.strip()]
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(x) if isinstance(x, Path) else x) for k, x in d.items()}

    def public_dict(self) -> dict[str, Any]:
        """The options minus the secret, for logs and the info route."""
        d = self.to_dict()
        d["api_key"] = "***" if self.api_key else None
        return d


def _bad(name: str, want: str, value: Any) -> ConfigError:
    return ConfigError(f"{name} must be {want}, got {value!r}")


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"from {lo:g} to {hi:g}"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"


def _check_int(cfg: ServerConfig, name: str, lo: int | None, hi: int | None) -> None:
    value = getattr(cfg, name)
    want = f"an integer {_range_text(lo, hi)}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, want, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(name, want, value)


def _check_number(cfg: ServerConfig, name: str, lo: float | None, hi: float | None) -> None:
    value = getattr(cfg, name)
    want = f"a number {_range_text(lo, hi)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, want, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(name, want, value)


def _check_choice(cfg: ServerConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# -------------------------------------------------------------------------------------- profiles


def profile_dirs() -> list[Path]:
    """Where named profiles are looked up, first match wins."""
    package = Path(__file__).resolve().parents[1] / "profiles"
    # src/foleyserve/server/settings.py -> the checkout root, when running from a source tree.
    checkout = Path(__file__).resolve().parents[3] / "profiles"
    return [d for d in (checkout, package) if d.is_dir()]


def profile_names() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_profile(name_or_path: str | os.PathLike) -> Path:
    """A profile name (``realtime``) or the path of a YAML file -> the file to read."""
    text = str(name_or_path)
    as_path = Path(text).expanduser()
    looks_like_path = as_path.suffix.lower() in (".yaml", ".yml") or os.sep in text or "/" in text
    if looks_like_path:
        if not as_path.is_file():
            raise ConfigError(f"profile file {as_path} does not exist; give a YAML file or one of: {', '.join(profile_names())}")
        return as_path
    for d in profile_dirs():
        candidate = d / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"unknown profile {text!r}; choose one of {', '.join(profile_names()) or '(none found)'} or give a path to a YAML file")


def load_profile(name_or_path: str | os.PathLike) -> tuple[EngineConfig, ServerConfig]:
    """Read a profile into engine and server options, checked.

    The model source (``model_dir`` or ``demo``) usually comes from the command line at serve time,
    so a profile without one is accepted; everything else in the engine section is checked here.
    """
    import yaml

    path = find_profile(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"profile {path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a mapping with the sections {', '.join(PROFILE_SECTIONS)}")
    unknown = sorted(str(k) for k in set(raw) - set(PROFILE_SECTIONS))
    if unknown:
        raise ConfigError(f"profile {path}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(PROFILE_SECTIONS)}")
    sections = {}
    for name in PROFILE_SECTIONS:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"profile {path}: '{name}' must be a mapping of options, got {type(section).__name__}")
        sections[name] = section
    try:
        engine = EngineConfig.from_dict(sections["engine"])
        check_engine_options(engine)
        server = ServerConfig.from_dict(sections["server"]).validate()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"profile {path}: {e}") from None
    return engine, server


def check_engine_options(engine: EngineConfig) -> EngineConfig:
    """EngineConfig.validate without insisting on a model source (that may come later from flags)."""
    if engine.model_dir is None and not engine.demo:
        replace(engine, demo=True).validate()
    else:
        engine.validate()
    if not isinstance(engine.compile, bool):
        raise ConfigError(f"compile must be true or false, got {engine.compile!r}")
    return engine
