"""Server options and deployment profiles.

A profile is a YAML file with two top-level sections, ``engine:`` (the :class:`EngineConfig`
fields) and ``server:`` (the :class:`ServerConfig` fields). The shipped profiles live in
``foleyserve/profiles/`` inside the package (so they survive ``pip install``) and, for people
reading the repository, in ``profiles/`` at its root; a checkout's root copy wins so an edit
there takes effect without reinstalling.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin, get_type_hints

import pydantic
from pydantic import AfterValidator, Field

from foleyserve.config import ConfigError, EngineConfig

PRIORITIES = ("interactive", "bulk")
CACHE_MODES = ("off", "memory", "disk")
LENGTH_BUCKETS = ("exact", "second")  # see foleyserve.runtime.batcher
PROFILE_SECTIONS = ("engine", "server")
API_KEY_ENV = "FOLEYSERVE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

# Field types with their ranges: the dataclass stays lax to build (profiles and flags fill it in
# steps), and ServerConfig.validate checks every field against these with pydantic.
Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _database_url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("not a PostgreSQL URL")
    return value


def _cache_mode(value: str) -> str:
    if value not in CACHE_MODES and not value.startswith(("redis://", "rediss://")):
        raise ValueError("not a cache mode")
    return value


@dataclass
class ServerConfig:
    """How the HTTP service runs. Every field can be set in a profile's ``server:`` section."""

    host: str = "127.0.0.1"
    port: Annotated[Int, Field(ge=0, le=65535)] = 8000  # 0: any free port (the chosen one is printed)
    data_dir: Path = Path("foleyserve-data")  # jobs.sqlite3, uploads/, results/, cache/
    log_level: Literal[LOG_LEVELS] = "info"  # type: ignore[valid-type]
    # Request limits. Frames are reduced to the encoders' sizes as they are decoded, so a request
    # holds one full-resolution frame at a time; the pixel limit bounds that frame and the decode
    # time (a 4K frame costs ~4x a 1080p one to decode and resize).
    max_upload_mb: Annotated[Number, Field(ge=0.001)] = 200.0
    max_video_pixels: Annotated[Int, Field(ge=1)] = 1920 * 1088
    # Uploads are refused (507) while the data directory has less free space than this, so a
    # filling disk stops new work before it breaks running jobs' result writes.
    min_free_mb: Annotated[Number, Field(ge=0)] = 100.0
    max_prompt_chars: Annotated[Int, Field(ge=1)] = 2000
    max_steps: Annotated[Int, Field(ge=1, le=1000)] = 1000  # the engine's own range; a profile can cap it (cost grows with steps)
    # Defaults for fields a request leaves out.
    default_steps: Annotated[Int, Field(ge=1, le=1000)] = 50
    default_guidance: Annotated[Number, Field(ge=0, le=100)] = 4.5
    default_priority: Literal[PRIORITIES] = "interactive"  # type: ignore[valid-type]
    # Batcher (see foleyserve.runtime.batcher.BatcherConfig).
    max_batch_size: Annotated[Int, Field(ge=1, le=256)] = 4
    max_wait_ms: Annotated[Number, Field(ge=0, le=60_000)] = 10.0
    max_queue: Annotated[Int, Field(ge=1)] = 64
    length_bucket: Literal[LENGTH_BUCKETS] = "exact"  # type: ignore[valid-type]
    # Feature and result cache: off, memory, disk or redis://host:port/db.
    cache: Annotated[str, AfterValidator(_cache_mode)] = "disk"
    cache_dir: Path | None = None  # None: <data_dir>/cache
    cache_max_gb: Annotated[Number, Field(ge=0)] = 2.0
    cache_memory_mb: Annotated[Number, Field(ge=0)] = 256.0
    # Access. The key is better passed through the FOLEYSERVE_API_KEY environment variable than
    # written into a profile.
    api_key: Annotated[str, Field(pattern=r"\S")] | None = None
    cors_origins: list[Annotated[str, Field(min_length=1)]] = field(default_factory=list)
    metrics_public: Annotated[bool, Field(strict=True)] = True
    # Result retention: finished jobs' files are deleted past this age or when the results
    # together pass this size (oldest first); None disables that limit.
    retention_hours: Annotated[Number, Field(ge=0)] | None = 24.0
    retention_max_gb: Annotated[Number, Field(ge=0)] | None = 10.0
    retention_interval_s: Annotated[Number, Field(ge=0.1)] = 60.0
    # On shutdown the running batch may finish within this many seconds; after that it is cut
    # short and re-runs on the next start (its upload is kept).
    shutdown_grace_s: Annotated[Number, Field(ge=0)] = 10.0
    # With engine.compile: the clip lengths (seconds) and batch sizes whose denoising step is
    # compiled (and on CUDA captured) before /readyz turns 200, so no user pays a compile.
    # Pair it with length_bucket: second, which keeps every request inside these buckets.
    warmup_seconds: list[Annotated[Number, Field(ge=0.64, le=15.04)]] = field(default_factory=list)
    warmup_batch_sizes: list[Annotated[Int, Field(ge=1, le=256)]] = field(default_factory=lambda: [1])
    # Load the best-of scorers (Synchformer audio branch + sync head, CLAP audio tower) before
    # /readyz turns 200, so the first best_of job does not pay for it inside the job. Off by default:
    # they cost host/device memory that servers without best-of traffic do not need.
    preload_scorers: Annotated[bool, Field(strict=True)] = False
    # Scale out (foleyserve serve --ray, docs/scale-out.md). database_url puts the jobs in
    # PostgreSQL (postgresql://user@host:5432/db; better passed through FOLEYSERVE_DATABASE_URL, it
    # may carry a password) instead of data_dir/jobs.sqlite3, so that every replica sees every job;
    # data_dir must then be storage every replica mounts (NFS, EFS), since uploads and results live there.
    database_url: Annotated[str, AfterValidator(_database_url)] | None = None
    # A replica holds a job for this long and renews it every third of it; a replica that dies
    # stops renewing, and its jobs go back to the queue when the lease runs out.
    lease_seconds: Annotated[Number, Field(ge=1, le=3600)] = 30.0
    # Engine replicas under Ray Serve: a fixed count, or autoscaling between [min, max] (wins).
    replicas: Annotated[Int, Field(ge=1, le=1024)] = 1
    autoscale: Annotated[list[Annotated[Int, Field(ge=0, le=1024)]], Field(min_length=2, max_length=2)] | None = None
    # GPUs each engine replica reserves (1 on a GPU cluster: one replica per GPU; 0 runs on CPUs).
    replica_gpus: Annotated[Number, Field(ge=0, le=8)] = 0.0
    replica_cpus: Annotated[Number, Field(ge=0, le=256)] = 1.0
    # The Ray cluster to join (ray://host:10001 or auto); None starts a local one.
    ray_address: Annotated[str, Field(min_length=1)] | None = None

    # -- derived -------------------------------------------------------------------------------

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.data_dir) / "cache"

    # -- checks and conversion -------------------------------------------------------------------

    def validate(self) -> "ServerConfig":
        """Check every field (types and ranges, by pydantic) and the one cross-field rule;
        :class:`ConfigError` names the field, the rule and the value."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            _ADAPTER.validate_python(values)
        except pydantic.ValidationError as e:
            raise ConfigError(_describe(e, values)) from None
        # min >= 1: with no replica the API refuses jobs (503), so no queue would ever grow to
        # make the autoscaler start one.
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ConfigError(f"autoscale must be [min, max] with 1 <= min <= max, got {self.autoscale!r}")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps must be an integer from 1 to {self.max_steps}, got {self.default_steps!r}")
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
        if self.database_url:
            d["database_url"] = redact_url(self.database_url)
        return d


def redact_url(url: str) -> str:
    """A database URL with its password replaced, for logs and error messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


_ADAPTER = pydantic.TypeAdapter(ServerConfig)

# Rules pydantic's own wording would not make plain.
_SPECIAL_RULES = {
    "cache": f"one of {', '.join(CACHE_MODES)} or a redis://host:port/db URL",
    "api_key": "a non-empty string, or null for no authentication",
    "cors_origins": "a list of origins like 'https://example.com'",
    "metrics_public": "true or false",
    "warmup_seconds": "a list of clip lengths between 0.64 and 15.04 s",
    "warmup_batch_sizes": "a list of whole numbers 1-256",
    "preload_scorers": "true or false",
    "database_url": "a postgresql://user@host:port/database URL, or null for the local SQLite file",
    "autoscale": "a list of two whole numbers [min, max] with 1 <= min <= max, or null",
    "ray_address": "a Ray address such as ray://head:10001 or auto, or null for a local Ray",
}


def _rule(hint: Any) -> str:
    """'an integer from 1 to 256', 'a number >= 0.001', 'one of a, b' from a field's type."""
    args = get_args(hint)
    if get_origin(hint) is Literal:
        return f"one of {', '.join(map(str, args[0] if len(args) == 1 and isinstance(args[0], tuple) else args))}"
    if get_origin(hint) is not Annotated:
        members = [a for a in args if a is not type(None)]
        return _rule(members[0]) if members else "valid"
    base, *meta = args
    while get_origin(base) is Annotated:
        base, *more = get_args(base)
        meta = [*more, *meta]
    lo = hi = None
    for m in meta:
        for c in getattr(m, "metadata", [m]):
            lo = getattr(c, "ge", lo)
            hi = getattr(c, "le", hi)
    noun = "an integer" if base is int else "a number" if base is float else "valid"
    if lo is not None and hi is not None:
        return f"{noun} from {lo:g} to {hi:g}"
    return f"{noun} >= {lo:g}" if lo is not None else f"{noun} <= {hi:g}" if hi is not None else noun


_RULES = {name: _SPECIAL_RULES.get(name) or _rule(hint) for name, hint in get_type_hints(ServerConfig, include_extras=True).items()}


def _describe(error: pydantic.ValidationError, values: Mapping[str, Any]) -> str:
    parts = []
    for item in error.errors(include_url=False):
        name = str(item["loc"][0]) if item["loc"] else "value"
        parts.append(f"{name} must be {_RULES.get(name, 'valid')}, got {values.get(name, item.get('input'))!r}")
    return "; ".join(dict.fromkeys(parts))


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
