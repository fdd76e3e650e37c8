"""The feature and result cache: visual features, text embeddings and finished waveforms.

Three levels, each keyed by a content hash:

* ``visual``: SigLIP2 + Synchformer features, keyed by the exact uint8 frames both encoders consume
  (:func:`frames_key`), so re-uploading a clip, or a new prompt for the same clip, skips the
  encoders.
* ``text``: CLAP embeddings of the (normalised) prompt pair (:func:`text_key`).
* ``result``: the finished waveform, keyed by everything that fixes it (:func:`result_key`); a hit
  runs no model at all.

Visual and text entries are also keyed by ``namespace`` (the engine's identity), because features
of one model are meaningless to another; result keys already name the model and precision.

Storage is two tiers: an in-process LRU of serialised entries bounded by ``memory_bytes``, in front
of a shared backend (``diskcache`` on local disk, or Redis shared by replicas). Values are
safetensors bytes behind a small JSON header and are never pickled: whoever can write to a shared
Redis must not be able to run code in this process.

A cache must never be the reason a request fails: backend errors (Redis down, disk full, a corrupt
entry) are logged once and served as misses / dropped writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import diskcache
import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from foleyserve import media
from foleyserve.pipeline.features import TextFeatures, VisualFeatures

log = logging.getLogger(__name__)

LEVELS = ("visual", "text", "result")
URL_FORMS = 'None or "off" (disabled), "memory", "disk" (with directory=...), or "redis://host:port/db" (also rediss://)'

# Entry layout: MAGIC, u32 little-endian header length, JSON header, safetensors payload.
_MAGIC = b"FSCACHE1"
_MAX_HEADER = 1 << 20
# After a backend outage, skip it for this long before trying again, so a dead Redis costs one
# failed connect per interval instead of one per request.
RETRY_AFTER_S = 5.0
# Key version: bump when what a key covers changes, so old entries are simply never found.
_KEY_VERSION = "1"

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# keys


def normalise_prompt(text: str) -> str:
    """Strip and collapse runs of whitespace to one space; case is kept (CLAP is case-sensitive)."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    return " ".join(text.split())


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def frames_key(decoded: media.DecodedVideo) -> str:
    """SHA-256 over the uint8 frames the two visual encoders consume (8 fps and 25 fps), shapes included.

    Both rates are hashed because the 25 fps frames carry motion the 8 fps ones do not see."""
    h = hashlib.sha256(f"foleyserve-frames-v{_KEY_VERSION}".encode())
    for fps in (media.SIGLIP_FPS, media.SYNC_FPS):
        frames = decoded.frames.get(fps) if isinstance(getattr(decoded, "frames", None), dict) else None
        if frames is None:
            raise ValueError(f"decoded video has no {fps} fps frames; decode it with engine.decode() before keying it")
        arr = np.asarray(frames)
        # The header makes shape part of the key: the same bytes split into other frames differ.
        h.update(json.dumps({"fps": fps, "dtype": str(arr.dtype), "shape": list(arr.shape)}).encode())
        if arr.flags.c_contiguous:
            h.update(memoryview(arr).cast("B"))
        else:
            for frame in arr:  # one frame at a time: no full-clip copy
                h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


def text_key(prompt: str, negative_prompt: str) -> str:
    return _digest({"v": _KEY_VERSION, "prompt": normalise_prompt(prompt), "negative": normalise_prompt(negative_prompt)})


def result_key(
    frames: str,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    model: str,
    precision: str,
) -> str:
    return _digest(
        {
            "v": _KEY_VERSION,
            "frames": str(frames),
            "prompt": normalise_prompt(prompt),
            "negative": normalise_prompt(negative_prompt),
            "seed": int(seed),
            "steps": int(steps),
            # float() so 4, 4.0 and numpy.float64(4.0) name the same result.
            "guidance": float(guidance),
            "model": str(model),
            "precision": str(precision),
        }
    )


# ---------------------------------------------------------------------------------------------
# values


@dataclass
class CachedResult:
    waveform: torch.Tensor  # [1, T] float32
    sample_rate: int
    meta: dict = field(default_factory=dict)  # json-able: seed, timings, model...


class CorruptEntry(ValueError):
    """A stored entry that cannot be read back as the value it claims to be."""


def _host(t: torch.Tensor) -> torch.Tensor:
    # A private contiguous CPU copy: safetensors refuses views that share storage (text and
    # uncond come out of one batched CLAP call), and the cache must not alias the caller's tensor.
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def encode_entry(level: str, value: Any) -> bytes:
    """Serialise a cache value of ``level`` to bytes (safetensors + JSON header)."""
    if level == "visual":
        if not isinstance(value, VisualFeatures):
            raise TypeError(f"put_visual takes VisualFeatures, got {type(value).__name__}")
        tensors = {"siglip": value.siglip, "sync": value.sync}
        meta: dict[str, Any] = {"frames_25fps": int(value.frames_25fps)}
    elif level == "text":
        if not isinstance(value, TextFeatures):
            raise TypeError(f"put_text takes TextFeatures, got {type(value).__name__}")
        tensors = {"text": value.text, "uncond": value.uncond}
        meta = {}
    elif level == "result":
        if not isinstance(value, CachedResult):
            raise TypeError(f"put_result takes CachedResult, got {type(value).__name__}")
        tensors = {"waveform": value.waveform}
        meta = {"sample_rate": int(value.sample_rate), "meta": value.meta}
    else:
        raise ValueError(f"unknown cache level {level!r}; one of {LEVELS}")
    header = json.dumps({"kind": level, "meta": meta}, allow_nan=False).encode("utf-8")
    payload = st_save({name: _host(t) for name, t in tensors.items()})
    return _MAGIC + struct.pack("<I", len(header)) + header + payload


def _tensor(tensors: dict[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    t = tensors.get(name)
    if t is None or t.ndim != ndim:
        raise CorruptEntry(f"tensor {name!r} missing or not {ndim}-D")
    return t


def decode_entry(level: str, blob: bytes) -> Any:
    """Inverse of :func:`encode_entry`; raises :class:`CorruptEntry` on anything unexpected."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptEntry(f"entry is {type(blob).__name__}, not bytes")
    blob = bytes(blob)
    if len(blob) < len(_MAGIC) + 4 or not blob.startswith(_MAGIC):
        raise CorruptEntry("not a foleyserve cache entry (bad magic)")
    (n,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    if n > _MAX_HEADER or start + n > len(blob):
        raise CorruptEntry("header length out of range")
    try:
        header = json.loads(blob[start : start + n].decode("utf-8"))
        tensors = st_load(blob[start + n :])
    except Exception as e:  # json, unicode and safetensors errors all mean the same thing here
        raise CorruptEntry(f"unreadable entry: {e}") from e
    if not isinstance(header, dict) or header.get("kind") != level or not isinstance(header.get("meta"), dict):
        raise CorruptEntry(f"entry is not a {level} entry")
    meta = header["meta"]
    try:
        if level == "visual":
            return VisualFeatures(
                siglip=_tensor(tensors, "siglip", 3), sync=_tensor(tensors, "sync", 3), frames_25fps=int(meta["frames_25fps"])
            )
        if level == "text":
            return TextFeatures(text=_tensor(tensors, "text", 3), uncond=_tensor(tensors, "uncond", 3))
        inner = meta["meta"]
        if not isinstance(inner, dict):
            raise CorruptEntry("result meta is not an object")
        return CachedResult(waveform=_tensor(tensors, "waveform", 2), sample_rate=int(meta["sample_rate"]), meta=inner)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptEntry):
            raise
        raise CorruptEntry(f"bad {level} metadata: {e}") from e


# ---------------------------------------------------------------------------------------------
# tiers


class _MemoryTier:
    """LRU of serialised entries bounded by their total size. Not locked: FoleyCache holds its lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self.bytes = {level: 0 for level in LEVELS}
        self.entries = {level: 0 for level in LEVELS}

    def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, level: str, blob: bytes) -> None:
        self.drop(key)
        if len(blob) > self.max_bytes:
            return  # would evict everything and still not fit
        self._items[key] = (level, blob)
        self.bytes[level] += len(blob)
        self.entries[level] += 1
        while sum(self.bytes.values()) > self.max_bytes:
            _, (old_level, old) = self._items.popitem(last=False)
            self.bytes[old_level] -= len(old)
            self.entries[old_level] -= 1

    def drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes[item[0]] -= len(item[1])
            self.entries[item[0]] -= 1

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._items)

    def level_stats(self) -> dict[str, tuple[int, int]]:
        return {level: (self.bytes[level], self.entries[level]) for level in LEVELS}


class _SafeDisk(diskcache.Disk):
    """diskcache's storage with pickling refused both ways: we only ever store bytes under str keys,
    so anything else found in the directory was not written by us and must not be unpickled."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # noqa: ANN001 (diskcache's signature)
        if not isinstance(value, bytes):
            raise TypeError("the foleyserve disk cache stores bytes only")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # noqa: ANN001
        if mode == diskcache.core.MODE_PICKLE:
            raise CorruptEntry("refusing to unpickle a disk cache entry")
        return super().fetch(mode, filename, value, read)

    def get(self, key, raw):  # noqa: ANN001
        if not raw:
            raise CorruptEntry("refusing to unpickle a disk cache key")
        return super().get(key, raw)


class _DiskBackend:
    """``diskcache.Cache`` bounded by ``size_limit`` with least-recently-used eviction."""

    name = "disk"
    outage_errors: tuple[type[BaseException], ...] = ()  # a full disk still reads: no circuit breaking

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.cache = diskcache.Cache(
            str(directory),
            size_limit=max_bytes,
            eviction_policy="least-recently-used",
            disk=_SafeDisk,
            # Fail fast on a locked database (another process writing): a miss is cheaper than a stall.
            timeout=2.0,
        )

    def get(self, key: str) -> bytes | None:
        try:
            return self.cache.get(key, default=None)
        except CorruptEntry:
            self.cache.delete(key)  # not ours (a pickle): remove it so it is not refused on every read
            raise

    def put(self, key: str, level: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return
        self.cache.set(key, blob, tag=level)
        # set() culls at most cull_limit items per call; cull() keeps going until under the limit.
        self.cache.cull()

    def drop(self, key: str) -> None:
        self.cache.delete(key)

    def level_stats(self) -> dict[str, tuple[int, int]]:
        # diskcache has no public per-tag totals; this reads its documented Cache table directly.
        # Small values live inline in the table (size 0, length in `value`), large ones in files.
        rows = self.cache._sql(
            "SELECT tag, COUNT(*), COALESCE(SUM(size), 0) + COALESCE(SUM(LENGTH(value)), 0) FROM Cache GROUP BY tag"
        ).fetchall()
        out = {level: (0, 0) for level in LEVELS}
        for tag, count, size in rows:
            if tag in out:
                out[tag] = (int(size), int(count))
        return out

    def volume(self) -> int:
        return int(self.cache.volume())

    def close(self) -> None:
        self.cache.close()


# Redis layout under PREFIX: "d:<level>:..." values; "lru" a sorted set of value keys scored by a
# shared logical clock ("clock", INCR), so recency is ordered across replicas without trusting
# their wall clocks; "size" a hash of value sizes; "stats" a hash of "<level>:bytes",
# "<level>:entries" and "total". The scripts below keep all four consistent atomically; the
# put script evicts least-recently-used values until "total" is within the budget.
_REDIS_PREFIX = "foleyserve:cache:"

_LUA_FORGET = """
local function forget(key, size_key, stats_key, lru_key, data_prefix)
  local size = tonumber(redis.call('HGET', size_key, key) or '-1')
  if size < 0 then return 0 end
  local level = string.match(string.sub(key, #data_prefix + 1), '^([^:]+)')
  redis.call('HDEL', size_key, key)
  redis.call('ZREM', lru_key, key)
  redis.call('HINCRBY', stats_key, level .. ':bytes', -size)
  redis.call('HINCRBY', stats_key, level .. ':entries', -1)
  redis.call('HINCRBY', stats_key, 'total', -size)
  return size
end
"""

# KEYS: value, lru, size, stats, clock. ARGV: blob, level, budget, data prefix.
_LUA_PUT = _LUA_FORGET + """
local budget = tonumber(ARGV[3])
local size = string.len(ARGV[1])
if size > budget then return -1 end
forget(KEYS[1], KEYS[3], KEYS[4], KEYS[2], ARGV[4])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[5]), KEYS[1])
redis.call('HINCRBY', KEYS[4], ARGV[2] .. ':bytes', size)
redis.call('HINCRBY', KEYS[4], ARGV[2] .. ':entries', 1)
local total = redis.call('HINCRBY', KEYS[4], 'total', size)
local evicted = 0
while total > budget do
  local victim = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not victim then break end
  local freed = forget(victim, KEYS[3], KEYS[4], KEYS[2], ARGV[4])
  if freed < 0 then redis.call('ZREM', KEYS[2], victim) else total = total - freed end
  redis.call('DEL', victim)
  evicted = evicted + 1
end
return evicted
"""

# KEYS: value, lru, size, stats, clock. ARGV: level, data prefix.
_LUA_GET = _LUA_FORGET + """
local value = redis.call('GET', KEYS[1])
if not value then
  -- evicted or flushed behind our back (the server's own maxmemory policy): fix the books
  forget(KEYS[1], KEYS[3], KEYS[4], KEYS[2], ARGV[2])
  return false
end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 0 then
  -- value present but its bookkeeping was lost: adopt it so the budget counts it again
  local size = string.len(value)
  redis.call('HSET', KEYS[3], KEYS[1], size)
  redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':bytes', size)
  redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':entries', 1)
  redis.call('HINCRBY', KEYS[4], 'total', size)
end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[5]), KEYS[1])
return value
"""

# KEYS: value, lru, size, stats. ARGV: data prefix.
_LUA_DROP = _LUA_FORGET + """
forget(KEYS[1], KEYS[3], KEYS[4], KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


class _RedisBackend:
    """Redis shared by replicas, bounded by our own byte budget (``max_bytes``) with LRU eviction.

    The budget covers everything foleyserve stores in that Redis database; replicas sharing it
    should use the same ``max_bytes`` (each write enforces the writer's). Set the server's
    ``maxmemory`` above the budget: its ``maxmemory-policy`` is then only a backstop, and entries it
    evicts on its own are noticed and un-counted on the next read. Standalone Redis only (the
    scripts touch keys they compute, which Redis Cluster does not allow)."""

    name = "redis"
    outage_errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

    def __init__(self, url: str, max_bytes: int) -> None:
        self.url = url
        self.max_bytes = max_bytes
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
            # One immediate retry covers a pooled connection that died with a server restart;
            # more would only stretch the time a request waits on a dead server.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        p = _REDIS_PREFIX
        self.data_prefix = p + "d:"
        self.meta_keys = [p + "lru", p + "size", p + "stats", p + "clock"]
        self._put = self.client.register_script(_LUA_PUT)
        self._get = self.client.register_script(_LUA_GET)
        self._drop = self.client.register_script(_LUA_DROP)

    def _level(self, key: str) -> str:
        return key.split(":", 1)[0]

    def get(self, key: str) -> bytes | None:
        return self._get(keys=[self.data_prefix + key, *self.meta_keys], args=[self._level(key), self.data_prefix])

    def put(self, key: str, level: str, blob: bytes) -> None:
        self._put(keys=[self.data_prefix + key, *self.meta_keys], args=[blob, level, self.max_bytes, self.data_prefix])

    def drop(self, key: str) -> None:
        self._drop(keys=[self.data_prefix + key, *self.meta_keys[:3]], args=[self.data_prefix])

    def level_stats(self) -> dict[str, tuple[int, int]]:
        raw = self.client.hgetall(self.meta_keys[2])
        values = {k.decode(): int(v) for k, v in raw.items()}
        return {level: (values.get(f"{level}:bytes", 0), values.get(f"{level}:entries", 0)) for level in LEVELS}

    def volume(self) -> int:
        return int(self.client.hget(self.meta_keys[2], "total") or 0)

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "foleyserve"


# ---------------------------------------------------------------------------------------------
# the cache


class FoleyCache:
    """Visual features, text embeddings and results, in memory and in a shared backend.

    ``url``: ``None`` or ``"off"`` disables it (gets miss, puts are dropped); ``"memory"`` keeps an
    in-process LRU only (bounded by ``memory_bytes``); ``"disk"`` adds a diskcache in ``directory``
    bounded by ``max_bytes``; ``"redis://host:port/db"`` adds a Redis shared by replicas, also
    bounded by ``max_bytes``. Thread-safe; no method raises on backend trouble."""

    def __init__(
        self,
        url: str | None = "disk",
        *,
        directory: str | Path | None = None,
        max_bytes: int = 2 * 2**30,
        namespace: str = "",
        memory_bytes: int = 256 * 2**20,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("memory_bytes", memory_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
        if not isinstance(namespace, str):
            raise ValueError(f"namespace must be a string (the engine's model name and precision), got {namespace!r}")
        self.url = url
        self.namespace = namespace
        # Hashed so any model name is a safe key fragment of fixed length.
        self._ns = hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:16]
        self._lock = threading.Lock()
        self._memory = _MemoryTier(memory_bytes)
        self._backend: _DiskBackend | _RedisBackend | None = None
        self._hits = {level: 0 for level in LEVELS}
        self._misses = {level: 0 for level in LEVELS}
        self._warned: set[str] = set()
        self._down_until = 0.0
        self._failing = False
        self.retry_after = RETRY_AFTER_S
        self.enabled = True
        self._closed = False

        if url is None or url == "off":
            self.enabled = False
        elif url == "memory":
            pass
        elif url == "disk":
            path = Path(directory) if directory is not None else default_directory()
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._backend = _DiskBackend(path, max_bytes)
            except Exception as e:
                raise ValueError(
                    f"cannot open the disk cache in {path}: {e}; pass a writable directory, or url='memory' or 'off'"
                ) from e
        elif isinstance(url, str) and url.startswith(("redis://", "rediss://")):
            _check_redis_url(url)
            try:
                self._backend = _RedisBackend(url, max_bytes)
            except ValueError as e:
                raise ValueError(f"bad Redis URL {url!r}: {e}; use redis://host:port/db") from e
            # Not fatal: Redis may come up after us. Say so now rather than on the first request.
            self._call(self._backend.ping, None)
        else:
            raise ValueError(f"unknown cache url {url!r}: use {URL_FORMS}")

    # -- public API ----------------------------------------------------------------------------

    def get_visual(self, key: str) -> VisualFeatures | None:
        return self._get("visual", key)

    def put_visual(self, key: str, value: VisualFeatures) -> None:
        self._put("visual", key, value)

    def get_text(self, key: str) -> TextFeatures | None:
        return self._get("text", key)

    def put_text(self, key: str, value: TextFeatures) -> None:
        self._put("text", key, value)

    def get_result(self, key: str) -> CachedResult | None:
        return self._get("result", key)

    def put_result(self, key: str, value: CachedResult) -> None:
        self._put("result", key, value)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per level: this instance's hits and misses, and the bytes/entries held by the largest
        tier (the shared backend when there is one, else the memory tier)."""
        held: dict[str, tuple[int, int]] | None = None
        backend = self._backend
        if backend is not None and self.enabled:
            held = self._call(backend.level_stats, None)
        with self._lock:
            if held is None:
                held = self._memory.level_stats() if self.enabled else {level: (0, 0) for level in LEVELS}
            return {
                level: {"hits": self._hits[level], "misses": self._misses[level], "bytes": held[level][0], "entries": held[level][1]}
                for level in LEVELS
            }

    def close(self) -> None:
        """Release the backend; afterwards every get misses and puts are dropped."""
        with self._lock:
            backend, self._backend = self._backend, None
            self._closed = True
            self.enabled = False
        if backend is not None:
            try:
                backend.close()
            except Exception as e:  # closing a broken connection is not worth an error
                log.debug("closing the %s cache backend: %s", backend.name, e)

    def __enter__(self) -> "FoleyCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _key(self, level: str, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise TypeError(f"cache keys are non-empty strings from frames_key/text_key/result_key, got {key!r}")
        if level == "result":
            return f"result:{key}"
        return f"{level}:{self._ns}:{key}"

    def _get(self, level: str, key: str) -> Any:
        skey = self._key(level, key)
        if not self.enabled:
            with self._lock:
                self._misses[level] += 1
            return None
        with self._lock:
            blob = self._memory.get(skey)
        backend = self._backend
        from_backend = False
        if blob is None and backend is not None:
            blob = self._call(lambda: backend.get(skey), None)
            from_backend = blob is not None
        value = None
        if blob is not None:
            try:
                value = decode_entry(level, blob)
            except CorruptEntry as e:
                self._warn_once("corrupt", f"dropping a corrupt {level} cache entry ({e}); treating it as a miss")
                with self._lock:
                    self._memory.drop(skey)
                if backend is not None:
                    self._call(lambda: backend.drop(skey), None)
        with self._lock:
            if value is None:
                self._misses[level] += 1
            else:
                self._hits[level] += 1
                if from_backend:
                    self._memory.put(skey, level, bytes(blob))
        return value

    def _put(self, level: str, key: str, value: Any) -> None:
        skey = self._key(level, key)
        if not self.enabled:
            return
        try:
            blob = encode_entry(level, value)
        except Exception as e:  # a put is an optimisation: losing it must not fail the job
            self._warn_once(f"encode-{level}", f"not caching a {level} value: {e}")
            return
        with self._lock:
            self._memory.put(skey, level, blob)
        backend = self._backend
        if backend is not None:
            self._call(lambda: backend.put(skey, level, blob), None)

    def _call(self, fn: Callable[[], T], default: T) -> T:
        """Run a backend operation; any error becomes ``default`` and a warning (once per outage)."""
        backend = self._backend
        if backend is None or time.monotonic() < self._down_until:
            return default
        try:
            result = fn()
        except Exception as e:
            if isinstance(e, backend.outage_errors):
                with self._lock:
                    first = not self._failing
                    self._failing = True
                    self._down_until = time.monotonic() + self.retry_after
                if first:
                    log.warning(
                        "cache backend %s is unavailable (%s: %s); serving cache misses and retrying every %.0f s",
                        backend.name, type(e).__name__, e, self.retry_after,
                    )
            else:
                self._warn_once(f"error-{type(e).__name__}", f"cache backend {backend.name} error ({type(e).__name__}: {e}); treated as a miss")
            return default
        if self._failing:
            with self._lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.warning("cache backend %s is reachable again", backend.name)
        return result

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        if first:
            log.warning(message)
        else:
            log.debug(message)


def _check_redis_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises ValueError on a non-numeric port)
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}; use redis://host:port/db") from e
    db = parts.path.strip("/")
    if not parts.hostname or (db and not db.isdigit()):
        raise ValueError(f"bad Redis URL {url!r}: expected redis://host:port/db with a numeric db, e.g. redis://localhost:6379/0")
