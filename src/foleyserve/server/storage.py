"""The data directory's health, and the checks that keep a full or read-only disk from losing work.

A disk that fills or turns read-only mid-job must not leave jobs ``running`` forever or turn
uploads into 500s. This module answers three questions for the service:

* is an exception a storage fault (disk full, quota, read-only, I/O error), not a bug;
* is the data directory usable right now (free space above a floor, a small write succeeds),
  checked at most once a second so that admission and probes stay cheap;
* is a result file still what was written (size and SHA-256 recorded at write time).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Callable

# errno values that mean "the disk refuses writes", as opposed to a bug in our code.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
# SQLite reports the same faults in its own words.
_SQLITE_STORAGE_WORDS = ("disk is full", "readonly database", "disk i/o error", "unable to open database")
# How often the service's janitor re-checks the disk.
CHECK_INTERVAL_S = 1.0
_HASH_CHUNK = 1 << 20


def is_storage_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is the disk refusing a write."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and any(w in str(exc).lower() for w in _SQLITE_STORAGE_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def describe_storage_error(exc: BaseException) -> str:
    """A client-safe phrase for a storage fault (no paths)."""
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "full" in text:
        return "the server's disk is full"
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text:
        return "the server's data directory is read-only"
    return "the server's disk reported an I/O error"


class StorageHealth:
    """Whether the data directory takes writes.

    :meth:`problem` only reads the last verdict, so the event loop (admission, probes) never
    touches the disk; :meth:`refresh` does the I/O and runs on the service's janitor thread
    about once a second. A failed write reported through :meth:`write_failed` counts at once,
    and is cleared only when a real write to the job store succeeds again (a probe file can
    succeed while SQLite's own files are read-only or full).
    """

    def __init__(self, data_dir: Path, min_free_bytes: int) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_bytes = int(min_free_bytes)
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._write_failure: str | None = None  # the last failed write, until a store write succeeds

    def problem(self) -> str | None:
        """None when the data directory is usable, else what is wrong and what to do (no I/O)."""
        with self._lock:
            return self._problem or self._write_failure

    def write_failed(self, exc: BaseException) -> None:
        """Record a write the disk refused; admission and /readyz see it at once."""
        with self._lock:
            self._write_failure = f"{describe_storage_error(exc)} (a write failed); new jobs are refused until it takes writes again"

    def write_succeeded(self) -> None:
        with self._lock:
            self._write_failure = None

    def refresh(self, store_probe: Callable[[], None] | None = None) -> str | None:
        """Check the disk now (free space, a small fsynced write, and after a failed write a
        real write to the store through ``store_probe``); returns the new verdict."""
        problem = self._check()
        with self._lock:
            failed = self._write_failure is not None
        if problem is None and failed and store_probe is not None:
            try:
                store_probe()
            except Exception as e:
                if not is_storage_error(e):
                    raise
            else:
                self.write_succeeded()
        with self._lock:
            self._problem = problem
        return self.problem()

    def _check(self) -> str | None:
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError as e:
            return f"{describe_storage_error(e)} (the data directory cannot be read); the operator must fix it"
        if free < self.min_free_bytes:
            return (
                f"the server's disk is full ({free / 2**20:.0f} MiB free, {self.min_free_bytes / 2**20:.0f} MiB needed); "
                f"new jobs are refused until the operator frees space"
            )
        probe = self.data_dir / f".write-probe-{uuid.uuid4().hex}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return f"{describe_storage_error(e)}; new jobs are refused until the operator fixes it"
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
        return None


def file_digest(path: Path) -> list:
    """[size, sha256 hex] of a file, as recorded in a job's ``checksums``."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return [size, h.hexdigest()]


class ResultVerifier:
    """Checks a result file against its recorded digest before it is served. A file that passed
    is not hashed again until its size or modification time changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verified: dict[str, tuple[int, int]] = {}

    def check(self, path: Path, expected: list | None) -> str | None:
        """None when the file is intact, else what is wrong with it."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "unreadable"
        if st.st_size == 0:
            return "empty"
        if expected is None:
            return None  # a result written before checksums were recorded
        size, digest = int(expected[0]), str(expected[1])
        if st.st_size != size:
            return f"truncated or changed ({st.st_size} bytes, {size} written)"
        stamp = (st.st_size, st.st_mtime_ns)
        key = str(path)
        with self._lock:
            if self._verified.get(key) == stamp:
                return None
        try:
            actual = file_digest(path)[1]
        except OSError:
            return "unreadable"
        if actual != digest:
            return "corrupted (its checksum does not match the one recorded when it was written)"
        with self._lock:
            self._verified[key] = stamp
            if len(self._verified) > 4096:
                self._verified.pop(next(iter(self._verified)))
        return None
