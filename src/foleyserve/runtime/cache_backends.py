"""The cache's storage tiers: an in-process LRU of serialised entries, and the shared backends
(diskcache on local disk, Redis across replicas). See :mod:`foleyserve.runtime.cache`."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import diskcache
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from foleyserve.runtime.cache_entries import LEVELS, CorruptEntry

# The cache's one logger, whichever module of it speaks.
log = logging.getLogger("foleyserve.runtime.cache")


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

