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
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from foleyserve.pipeline.features import TextFeatures, VisualFeatures
# Keys, entries and tiers live beside the cache; importing them from here keeps working.
from foleyserve.runtime.cache_backends import _DiskBackend, _MemoryTier, _RedisBackend, _SafeDisk  # noqa: F401
from foleyserve.runtime.cache_entries import (  # noqa: F401
    _KEY_VERSION, _MAGIC, LEVELS, CachedResult, CorruptEntry, decode_entry, encode_entry, frames_key, normalise_prompt,
    result_key, text_key,
)

log = logging.getLogger(__name__)

URL_FORMS = 'None or "off" (disabled), "memory", "disk" (with directory=...), or "redis://host:port/db" (also rediss://)'
# After a backend outage, skip it for this long before trying again, so a dead Redis costs one
# failed connect per interval instead of one per request.
RETRY_AFTER_S = 5.0

T = TypeVar("T")

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
