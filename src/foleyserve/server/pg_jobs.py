"""The job store in PostgreSQL, for a cluster: every replica and the ingress see the same jobs.

Same interface as :class:`foleyserve.server.jobs.JobStore` (add, update, update_if_active, get,
recent, active, counts, retention and the result-file helpers), plus what several engine replicas
need to share a queue safely:

* :meth:`PgJobStore.claim` hands a job to one replica under a *lease* (owner + expiry, both in the
  row) and counts the attempt;
* :meth:`PgJobStore.renew` extends the leases a live replica holds; a replica that died stops
  renewing, and :meth:`PgJobStore.requeue_expired` puts its jobs back in the queue;
* :meth:`PgJobStore.update_if_leased` changes a job only for the replica and attempt that hold it,
  so a replica that lost its lease (it stalled, or was presumed dead) can never overwrite the
  outcome of the attempt that replaced it: a job reaches ``succeeded`` once;
* ``job_events`` records claims, expiries and final states (the audit trail the tests count).

Leases are timed by the database's clock, so replicas with skewed clocks still agree. The result
files stay on the shared ``data_dir`` (uploads/, results/), exactly as on one machine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from foleyserve.server.jobs import (
    _COLUMNS, ACTIVE_STATUSES, FINAL_STATUSES, IDEMPOTENCY_INDEX, DuplicateJob, JobRecord, ResultFiles, _encode, _from_row,
)

log = logging.getLogger("foleyserve.server")

_NOW = "extract(epoch from clock_timestamp())::double precision"
_ACTIVE = "status IN ('queued', 'preparing', 'running')"
# Any constant: serialises migrations when several replicas start against a fresh database.
_MIGRATION_LOCK = 0x466F6C6579

# version -> statements. Never edit a released step; add the next one.
PG_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, status TEXT NOT NULL, priority TEXT NOT NULL, params TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, finished DOUBLE PRECISION,
            cache_hit INTEGER NOT NULL DEFAULT 0, error_code TEXT, error_message TEXT,
            timings TEXT NOT NULL DEFAULT '{}', files TEXT NOT NULL DEFAULT '{}', result_bytes BIGINT NOT NULL DEFAULT 0,
            progress_step INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0, upload TEXT,
            audio_seconds DOUBLE PRECISION, video_seconds DOUBLE PRECISION, batch_size INTEGER,
            warnings TEXT NOT NULL DEFAULT '[]', expired DOUBLE PRECISION, owner TEXT,
            checksums TEXT NOT NULL DEFAULT '{}', ranking TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX jobs_created ON jobs (created)",
        "CREATE INDEX jobs_status ON jobs (status)",
        "CREATE INDEX jobs_owner ON jobs (owner, created)",
        "CREATE TABLE health (k TEXT PRIMARY KEY, v DOUBLE PRECISION)",
    ),
    2: (
        "ALTER TABLE jobs ADD COLUMN replica TEXT",
        "ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN idempotency_key TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION",
        IDEMPOTENCY_INDEX,
        f"CREATE INDEX jobs_leases ON jobs (lease_expires) WHERE lease_owner IS NOT NULL AND {_ACTIVE}",
        """CREATE TABLE job_events (
            seq BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, attempt INTEGER NOT NULL, replica TEXT,
            event TEXT NOT NULL, at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX job_events_job ON job_events (job_id, seq)",
        """CREATE TABLE replicas (
            id TEXT PRIMARY KEY, info TEXT NOT NULL DEFAULT '{}', started DOUBLE PRECISION NOT NULL,
            heartbeat DOUBLE PRECISION NOT NULL
        )""",
    ),
}
PG_SCHEMA_VERSION = max(PG_MIGRATIONS)


def migrate(conn: Any, target: int = PG_SCHEMA_VERSION) -> int:
    """Bring the schema to ``target`` in one transaction (all of a step or none of it), under an
    advisory lock so replicas starting together do not race. Returns the version found before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        found = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations").fetchone()["v"]
        if found > PG_SCHEMA_VERSION:
            raise RuntimeError(
                f"the job database was written by a newer foleyserve (schema {found} > {PG_SCHEMA_VERSION}); "
                f"upgrade foleyserve on every replica"
            )
        for version in range(found + 1, target + 1):
            for statement in PG_MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"INSERT INTO schema_migrations (version, applied) VALUES (%s, {_NOW})", (version,))
    return found


class PgJobStore(ResultFiles):
    """Job records in PostgreSQL (psycopg 3, a small connection pool); safe from any thread."""

    def __init__(self, url: str, data_dir: str | Path, *, pool_size: int = 8, connect_timeout_s: float = 30.0) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self._init_dirs(data_dir)
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
            kwargs={"autocommit": True, "row_factory": dict_row}, name="foleyserve-jobs",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._closed = False
        try:
            with self._pool.connection() as conn:
                migrate(conn)
        except BaseException:
            self._pool.close()
            raise

    # -- rows ------------------------------------------------------------------------------------

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> Any:
        with self._pool.connection() as conn:
            cur = conn.execute(sql, tuple(params))
            return cur.fetchall() if cur.description is not None else cur.rowcount

    def add(self, record: JobRecord) -> None:
        values = {c: _encode(c, getattr(record, c)) for c in _COLUMNS}
        cols = ", ".join(values)
        marks = ", ".join("%s" for _ in values)
        try:
            self._exec(f"INSERT INTO jobs ({cols}) VALUES ({marks})", values.values())
        except self._psycopg.errors.UniqueViolation:
            existing = self.find_by_key(record.idempotency_key, record.owner) if record.idempotency_key else None
            if existing is None:
                raise
            raise DuplicateJob(existing) from None

    def find_by_key(self, key: str, owner: str | None) -> JobRecord | None:
        """The job submitted with this Idempotency-Key by this client (None: without a client id)."""
        rows = self._exec("SELECT * FROM jobs WHERE idempotency_key = %s AND COALESCE(owner, '') = %s", (key, owner or ""))
        return _from_row(rows[0]) if rows else None

    @staticmethod
    def _assignments(changes: dict[str, Any]) -> tuple[str, list[Any]]:
        bad = sorted(set(changes) - set(_COLUMNS)) + (["id"] if "id" in changes else [])
        if bad or not changes:
            raise ValueError(f"cannot update job column(s) {', '.join(bad) or '(none given)'}")
        return ", ".join(f"{k} = %s" for k in changes), [_encode(k, v) for k, v in changes.items()]

    def update(self, job_id: str, **changes: Any) -> None:
        if not changes:
            return
        sets, values = self._assignments(changes)
        self._exec(f"UPDATE jobs SET {sets} WHERE id = %s", (*values, job_id))

    def update_if_active(self, job_id: str, **changes: Any) -> bool:
        """Apply changes only while the job is active (whoever holds it): the ingress uses this to
        cancel. A final status also drops the lease, so the holder's renewal tells it to stop."""
        sets, values = self._assignments(changes)
        if changes.get("status") in FINAL_STATUSES:
            sets += ", lease_owner = NULL, lease_expires = NULL"
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"UPDATE jobs SET {sets} WHERE id = %s AND {_ACTIVE} RETURNING attempt, replica", (*values, job_id)
            ).fetchall()
            if rows and changes.get("status") in FINAL_STATUSES:
                self._event(conn, job_id, rows[0]["attempt"], rows[0]["replica"], changes["status"])
        return bool(rows)

    def update_if_leased(self, job_id: str, owner: str, attempt: int, **changes: Any) -> bool:
        """Apply changes only while ``owner`` holds the job's lease for this ``attempt`` and the job
        is active. A final status ends the lease and is logged in job_events in the same
        transaction. False: the lease is gone (the job was cancelled, or handed to another replica)."""
        sets, values = self._assignments(changes)
        final = changes.get("status") in FINAL_STATUSES
        if final:
            sets += ", lease_owner = NULL, lease_expires = NULL"
        with self._pool.connection() as conn, conn.transaction():
            n = conn.execute(
                f"UPDATE jobs SET {sets} WHERE id = %s AND lease_owner = %s AND attempt = %s AND {_ACTIVE}",
                (*values, job_id, owner, attempt),
            ).rowcount
            if n and final:
                self._event(conn, job_id, attempt, owner, changes["status"])
        return n == 1

    # -- leases ----------------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Give an active job that nobody holds (or whose lease ran out) to ``owner`` for
        ``lease_s`` seconds; the row comes back with its new attempt number. None: taken or over."""
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"UPDATE jobs SET lease_owner = %s, lease_expires = {_NOW} + %s, attempt = attempt + 1, replica = %s "
                f"WHERE id = %s AND {_ACTIVE} AND (lease_owner IS NULL OR lease_expires < {_NOW}) RETURNING *",
                (owner, float(lease_s), owner, job_id),
            ).fetchall()
            if rows:
                self._event(conn, job_id, rows[0]["attempt"], owner, "claimed")
        return _from_row(rows[0]) if rows else None

    def renew(self, owner: str, job_ids: Iterable[str], lease_s: float) -> set[str]:
        """Extend ``owner``'s leases on these jobs; returns the ones it still holds (a job missing
        from the answer was cancelled, finished elsewhere, or re-queued after a missed renewal)."""
        ids = list(job_ids)
        if not ids:
            return set()
        rows = self._exec(
            f"UPDATE jobs SET lease_expires = {_NOW} + %s WHERE lease_owner = %s AND id = ANY(%s) AND {_ACTIVE} RETURNING id",
            (float(lease_s), owner, ids),
        )
        return {r["id"] for r in rows}

    def requeue_expired(self) -> list[str]:
        """Jobs whose lease ran out (their replica died or stalled) back to the queue, unclaimed,
        with their progress reset; returns their ids, oldest first."""
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires = NULL, replica = NULL, "
                f"started = NULL, progress_step = 0, progress_total = 0 "
                f"WHERE lease_owner IS NOT NULL AND lease_expires < {_NOW} AND {_ACTIVE} "
                f"RETURNING id, attempt, created, lease_owner AS gone",
            ).fetchall()
            for r in rows:
                self._event(conn, r["id"], r["attempt"], None, "lease_expired")
        return [r["id"] for r in sorted(rows, key=lambda r: r["created"])]

    def unclaimed(self) -> list[str]:
        """Active jobs no replica holds, oldest first (what a starting ingress must dispatch)."""
        rows = self._exec(f"SELECT id FROM jobs WHERE lease_owner IS NULL AND {_ACTIVE} ORDER BY created")
        return [r["id"] for r in rows]

    def holder(self, job_id: str) -> tuple[str | None, float | None]:
        rows = self._exec("SELECT lease_owner, lease_expires FROM jobs WHERE id = %s", (job_id,))
        return (rows[0]["lease_owner"], rows[0]["lease_expires"]) if rows else (None, None)

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail (claimed, lease_expired, succeeded, failed, cancelled), oldest first."""
        if job_id is None:
            return self._exec("SELECT job_id, attempt, replica, event, at FROM job_events ORDER BY seq")
        return self._exec("SELECT job_id, attempt, replica, event, at FROM job_events WHERE job_id = %s ORDER BY seq", (job_id,))

    @staticmethod
    def _event(conn: Any, job_id: str, attempt: int, replica: str | None, event: str) -> None:
        conn.execute(
            f"INSERT INTO job_events (job_id, attempt, replica, event, at) VALUES (%s, %s, %s, %s, {_NOW})",
            (job_id, attempt, replica, event),
        )

    # -- replicas --------------------------------------------------------------------------------

    def replica_heartbeat(self, replica_id: str, info: dict[str, Any]) -> None:
        """Record that a replica is alive, with what it reports about itself (ready, queue, device)."""
        self._exec(
            f"INSERT INTO replicas (id, info, started, heartbeat) VALUES (%s, %s, {_NOW}, {_NOW}) "
            f"ON CONFLICT (id) DO UPDATE SET info = EXCLUDED.info, heartbeat = EXCLUDED.heartbeat",
            (replica_id, json.dumps(info)),
        )

    def replicas(self, max_age_s: float) -> list[dict[str, Any]]:
        """Replicas heard from within ``max_age_s`` seconds, oldest first, with ``age_s``."""
        rows = self._exec(
            f"SELECT id, info, started, {_NOW} - heartbeat AS age FROM replicas WHERE heartbeat > {_NOW} - %s ORDER BY started",
            (float(max_age_s),),
        )
        return [{**json.loads(r["info"]), "id": r["id"], "started": r["started"], "age_s": round(r["age"], 3)} for r in rows]

    def remove_replica(self, replica_id: str) -> None:
        self._exec("DELETE FROM replicas WHERE id = %s", (replica_id,))

    # -- reads -----------------------------------------------------------------------------------

    def probe_write(self) -> None:
        """A real write (a one-row table), to tell whether the database takes writes."""
        self._exec("INSERT INTO health (k, v) VALUES ('probe', %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v", (time.time(),))

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._exec("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return _from_row(rows[0]) if rows else None

    def delete(self, job_id: str) -> None:
        self._exec("DELETE FROM jobs WHERE id = %s", (job_id,))

    def recent(self, limit: int = 20, owner: str | None = None) -> list[JobRecord]:
        """The newest jobs submitted with this ``owner`` (None: the jobs submitted without one)."""
        rows = self._exec(
            "SELECT * FROM jobs WHERE owner IS NOT DISTINCT FROM %s ORDER BY created DESC LIMIT %s", (owner, int(limit))
        )
        return [_from_row(r) for r in rows]

    def active(self) -> list[JobRecord]:
        """Jobs queued or running anywhere in the cluster, oldest first."""
        return [_from_row(r) for r in self._exec(f"SELECT * FROM jobs WHERE {_ACTIVE} ORDER BY created")]

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def active_count(self) -> int:
        return int(self._exec(f"SELECT COUNT(*) AS n FROM jobs WHERE {_ACTIVE}")[0]["n"])

    def enforce_retention(self, *, max_age_s: float | None, max_bytes: int | None, now: float | None = None) -> list[str]:
        """As :meth:`JobStore.enforce_retention`: the files of old finished jobs, then of the
        oldest until the results fit; their rows are marked expired. Returns the expired ids."""
        now = time.time() if now is None else now
        rows = self._exec(
            "SELECT id, finished, files, result_bytes FROM jobs WHERE status = 'succeeded' AND expired IS NULL ORDER BY finished"
        )
        total = sum(r["result_bytes"] for r in rows)
        doomed = []
        for r in rows:
            too_old = max_age_s is not None and r["finished"] is not None and now - r["finished"] > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if too_old or too_big:
                doomed.append(r)
                total -= r["result_bytes"]
        for r in doomed:
            for name in json.loads(r["files"]).values():
                self._unlink(self.result_path(name))
            self.update(r["id"], expired=now)
        return [r["id"] for r in doomed]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.close()


assert set(ACTIVE_STATUSES) == {"queued", "preparing", "running"}  # _ACTIVE spells them out
