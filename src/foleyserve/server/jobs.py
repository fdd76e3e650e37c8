"""The job store: every generation job's state in SQLite, its result files on local disk.

Layout under the data directory::

    jobs.sqlite3        one row per job (WAL mode, so readers never wait on the writer)
    uploads/<id>.upload the uploaded video, kept until the job ends (a restart re-queues from it)
    results/<id>.wav    the result audio (always written, also for mp4 jobs)
    results/<id>.flac   the requested format, when it is not wav
    results/<id>.mp4
    results/<id>_seed<S>.<fmt>  one per sample of a num_samples or best_of job (server/results.py)

One connection serves all threads behind a lock: the writes are tiny (a status or progress
change), far below what would make a connection pool worth its complexity.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "preparing", "running")
SCHEMA_VERSION = 4
# Columns added after schema 1, applied to an older database when it is opened.
_MIGRATIONS = {
    2: (
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN checksums TEXT NOT NULL DEFAULT '{}'",
    ),
    3: ("ALTER TABLE jobs ADD COLUMN ranking TEXT NOT NULL DEFAULT '{}'",),
    4: (
        "ALTER TABLE jobs ADD COLUMN replica TEXT",
        "ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN idempotency_key TEXT",
    ),
}
_ACTIVE_SQL = "(" + ", ".join(f"'{s}'" for s in ACTIVE_STATUSES) + ")"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    priority      TEXT NOT NULL,
    params        TEXT NOT NULL,
    created       REAL NOT NULL,
    started       REAL,
    finished      REAL,
    cache_hit     INTEGER NOT NULL DEFAULT 0,
    error_code    TEXT,
    error_message TEXT,
    timings       TEXT NOT NULL DEFAULT '{}',
    files         TEXT NOT NULL DEFAULT '{}',
    result_bytes  INTEGER NOT NULL DEFAULT 0,
    progress_step INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    upload        TEXT,
    audio_seconds REAL,
    video_seconds REAL,
    batch_size    INTEGER,
    warnings      TEXT NOT NULL DEFAULT '[]',
    expired       REAL,
    owner         TEXT,
    checksums     TEXT NOT NULL DEFAULT '{}',
    ranking       TEXT NOT NULL DEFAULT '{}',
    replica       TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""
_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created)"
# One job per (client, Idempotency-Key); COALESCE because a unique index treats NULLs as distinct,
# and keys sent without a client id must collide too.
IDEMPOTENCY_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (COALESCE(owner, ''), idempotency_key) "
    "WHERE idempotency_key IS NOT NULL"
)

_JSON_COLUMNS = ("params", "timings", "files", "warnings", "checksums", "ranking")


@dataclass
class JobRecord:
    id: str
    status: str
    priority: str
    params: dict[str, Any]  # prompt, negative_prompt, steps, guidance, seed, output, keep_original_audio
    created: float  # unix time
    started: float | None = None
    finished: float | None = None
    cache_hit: bool = False
    error_code: str | None = None
    error_message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # "audio" / "video" -> file name in results/
    result_bytes: int = 0
    progress_step: int = 0
    progress_total: int = 0
    upload: str | None = None  # file name in uploads/ while the job may still need it
    audio_seconds: float | None = None
    video_seconds: float | None = None
    batch_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    expired: float | None = None  # when retention (or a DELETE) removed the result files
    # The X-Client-Id the job was submitted with: listing recent jobs shows a caller only its own.
    owner: str | None = None
    # file name -> [size in bytes, sha256 hex], recorded when the result was written, checked
    # before a file is served.
    checksums: dict[str, list] = field(default_factory=dict)
    # A best_of job's scores (bestof.Ranking.as_dict(): best, ranked_by, candidates, notes); {} otherwise.
    ranking: dict[str, Any] = field(default_factory=dict)
    # Which engine replica runs (or ran) the job: None on a single-machine server, and while a
    # clustered job waits in the queue.
    replica: str | None = None
    # How many times a replica claimed the job (a lease that ran out hands it to another one).
    attempt: int = 0
    # The Idempotency-Key header the job was submitted with: a retry with the same key (and client
    # id) gets this job back instead of a second one.
    idempotency_key: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


_COLUMNS = tuple(JobRecord.__dataclass_fields__)


class DuplicateJob(Exception):
    """``add`` refused a record whose Idempotency-Key (for the same client) is already taken."""

    def __init__(self, existing: JobRecord) -> None:
        super().__init__(f"job {existing.id} already has this idempotency key")
        self.existing = existing


def open_store(config: Any) -> Any:
    """The job store a :class:`~foleyserve.server.settings.ServerConfig` asks for: PostgreSQL when
    it has a ``database_url`` (a cluster), else SQLite in ``data_dir`` (one machine)."""
    if getattr(config, "database_url", None):
        from foleyserve.server.pg_jobs import PgJobStore  # psycopg only where it is used

        return PgJobStore(config.database_url, config.data_dir)
    return JobStore(config.data_dir)


class ResultFiles:
    """The upload and result files of jobs under ``data_dir`` (shared by both stores: a cluster
    keeps them on storage every replica mounts)."""

    data_dir: Path
    uploads_dir: Path
    results_dir: Path

    def _init_dirs(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.uploads_dir = self.data_dir / "uploads"
        self.results_dir = self.data_dir / "results"
        for d in (self.data_dir, self.uploads_dir, self.results_dir):
            d.mkdir(parents=True, exist_ok=True)

    def upload_path(self, job_id: str) -> Path:
        return self.uploads_dir / f"{job_id}.upload"

    def result_path(self, name: str) -> Path:
        # Names come from our own records (id + fixed suffix), never from a request.
        return self.results_dir / Path(name).name

    def remove_results(self, job_id: str) -> None:
        for pattern in (f"{job_id}.*", f"{job_id}_seed*"):  # a job's own files, and its samples'
            for p in self.results_dir.glob(pattern):
                _unlink(p)

    def orphan_uploads(self, keep: Iterable[str]) -> list[Path]:
        """Uploads no live job refers to (left by a crash between saving and recording)."""
        keep = set(keep)
        return [p for p in self.uploads_dir.glob("*.upload") if p.name not in keep]

    @staticmethod
    def _unlink(path: Path) -> None:
        _unlink(path)


class JobStore(ResultFiles):
    """Persistent job records; safe to call from any thread."""

    def __init__(self, data_dir: str | Path) -> None:
        self._init_dirs(data_dir)
        self.path = self.data_dir / "jobs.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL loses at most the last transactions on power loss, never corrupts.
            self._db.execute("PRAGMA synchronous=NORMAL")
            fresh = self._db.execute("SELECT name FROM sqlite_master WHERE name = 'jobs'").fetchone() is None
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if fresh or version == 0:
                version = SCHEMA_VERSION if fresh else 1
            if version <= SCHEMA_VERSION:
                # One transaction (SQLite's DDL is transactional): a migration cut short by a full
                # disk or a kill leaves the old schema, never half of the new one.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
                    for v in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS.get(v, ()):
                            column = statement.split("ADD COLUMN ", 1)[1].split()[0]
                            if column not in have:
                                self._db.execute(statement)
                    self._db.execute(_OWNER_INDEX)
                    self._db.execute(IDEMPOTENCY_INDEX)
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer foleyserve (schema {version} > {SCHEMA_VERSION}); "
                    f"upgrade foleyserve or use another --data-dir"
                )
        self._closed = False

    # -- rows ------------------------------------------------------------------------------------

    def add(self, record: JobRecord) -> None:
        values = _to_row(record)
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(values.values()))
            except sqlite3.IntegrityError:
                existing = self._find_by_key_locked(record.idempotency_key, record.owner) if record.idempotency_key else None
                if existing is None:
                    raise
                raise DuplicateJob(existing) from None

    def find_by_key(self, key: str, owner: str | None) -> JobRecord | None:
        """The job submitted with this Idempotency-Key by this client (None: without a client id)."""
        with self._lock:
            return self._find_by_key_locked(key, owner)

    def _find_by_key_locked(self, key: str, owner: str | None) -> JobRecord | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE idempotency_key = ? AND COALESCE(owner, '') = ?", (key, owner or "")
        ).fetchone()
        return _from_row(row) if row is not None else None

    def update(self, job_id: str, **changes: Any) -> None:
        if not changes:
            return
        bad = sorted(set(changes) - set(_COLUMNS) - {"id"}) + (["id"] if "id" in changes else [])
        if bad:
            raise ValueError(f"cannot update job column(s) {', '.join(bad)}")
        values = {k: _encode(k, v) for k, v in changes.items()}
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    def update_if_active(self, job_id: str, **changes: Any) -> bool:
        """Apply changes only while the job is queued or running, so a job ends once and a late
        progress report never overwrites a final status. True when the row changed."""
        bad = sorted(set(changes) - set(_COLUMNS)) + (["id"] if "id" in changes else [])
        if bad or not changes:
            raise ValueError(f"cannot update job column(s) {', '.join(bad) or '(none given)'}")
        values = {k: _encode(k, v) for k, v in changes.items()}
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN {_ACTIVE_SQL}",
                (*values.values(), job_id),
            )
            return cur.rowcount == 1

    def probe_write(self) -> None:
        """A real write to the database (a one-row table), to tell whether SQLite takes writes again."""
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS health (k TEXT PRIMARY KEY, v REAL)")
            self._db.execute("INSERT OR REPLACE INTO health (k, v) VALUES ('probe', ?)", (time.time(),))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recent(self, limit: int = 20, owner: str | None = None) -> list[JobRecord]:
        """The newest jobs submitted with this ``owner`` (None: the jobs submitted without one)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE owner IS ? ORDER BY created DESC LIMIT ?", (owner, int(limit))
            ).fetchall()
        return [_from_row(r) for r in rows]

    def active(self) -> list[JobRecord]:
        """Jobs that were queued or running, oldest first (what a restart must deal with)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN {_ACTIVE_SQL} ORDER BY created"
            ).fetchall()
        return [_from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    # -- files -----------------------------------------------------------------------------------

    def enforce_retention(self, *, max_age_s: float | None, max_bytes: int | None, now: float | None = None) -> list[str]:
        """Delete the files of finished jobs past the age limit, then of the oldest until the
        results fit in ``max_bytes``; their rows are marked expired. Returns the expired ids."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, finished, files, result_bytes FROM jobs "
                "WHERE status = 'succeeded' AND expired IS NULL ORDER BY finished"
            ).fetchall()
        total = sum(r["result_bytes"] for r in rows)
        doomed: list[sqlite3.Row] = []
        for r in rows:
            too_old = max_age_s is not None and r["finished"] is not None and now - r["finished"] > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                continue
            doomed.append(r)
            total -= r["result_bytes"]
        for r in doomed:
            for name in json.loads(r["files"]).values():
                _unlink(self.result_path(name))
            self.update(r["id"], expired=now)
        return [r["id"] for r in doomed]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._db.close()
                self._closed = True


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return json.dumps(value)
    if column == "cache_hit":
        return int(bool(value))
    return value


def _to_row(record: JobRecord) -> dict[str, Any]:
    return {c: _encode(c, getattr(record, c)) for c in _COLUMNS}


def _from_row(row: sqlite3.Row) -> JobRecord:
    values = {c: row[c] for c in _COLUMNS}
    for c in _JSON_COLUMNS:
        values[c] = json.loads(values[c]) if values[c] else ({} if c != "warnings" else [])
    values["cache_hit"] = bool(values["cache_hit"])
    return JobRecord(**values)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
