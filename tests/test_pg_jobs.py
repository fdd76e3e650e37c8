"""The PostgreSQL job store (server/pg_jobs.py) against a real PostgreSQL started here: the same
interface as the SQLite store, leases that run out, completion by the lease holder only,
idempotency keys and schema migrations."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

from postgres_server import PostgresServer, postgres_bin_dir, remove, start_postgres  # noqa: E402

from foleyserve.server.jobs import DuplicateJob, JobRecord, JobStore, open_store  # noqa: E402
from foleyserve.server.settings import ServerConfig  # noqa: E402

if postgres_bin_dir() is None:
    pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)", allow_module_level=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    remove(server)


@pytest.fixture()
def url(pg: PostgresServer) -> str:
    return pg.create_database()


@pytest.fixture()
def store(url: str, tmp_path: Path):
    from foleyserve.server.pg_jobs import PgJobStore

    s = PgJobStore(url, tmp_path / "data")
    yield s
    s.close()


def job(**kw) -> JobRecord:
    values = dict(id=uuid.uuid4().hex, status="queued", priority="interactive",
                  params={"prompt": "rain", "seed": 1}, created=time.time())
    return JobRecord(**{**values, **kw})


def test_config_selects_the_store(url: str, tmp_path: Path) -> None:
    s = open_store(ServerConfig(data_dir=tmp_path, database_url=url))
    try:
        assert type(s).__name__ == "PgJobStore" and not (tmp_path / "jobs.sqlite3").exists()
    finally:
        s.close()
    local = open_store(ServerConfig(data_dir=tmp_path / "one"))
    assert isinstance(local, JobStore)
    local.close()


def test_rows_behave_like_the_sqlite_store(store) -> None:
    a = job(owner="client-aaaa", params={"prompt": "a", "seed": 1, "n": [1, 2]})
    b = job(created=a.created + 1)
    store.add(a)
    store.add(b)
    got = store.get(a.id)
    assert got == a and got.params["n"] == [1, 2] and got.attempt == 0 and got.replica is None
    assert store.get("0" * 32) is None
    assert [r.id for r in store.recent(10, "client-aaaa")] == [a.id]
    assert [r.id for r in store.recent(10, None)] == [b.id]
    assert [r.id for r in store.active()] == [a.id, b.id]
    assert store.update_if_active(a.id, status="running", progress_step=2, progress_total=5)
    assert store.update_if_active(a.id, status="succeeded", files={"audio": f"{a.id}.wav"}, cache_hit=True)
    assert not store.update_if_active(a.id, status="failed")  # a final status is final
    got = store.get(a.id)
    assert got.status == "succeeded" and got.cache_hit is True and got.files == {"audio": f"{a.id}.wav"}
    assert store.counts() == {"succeeded": 1, "queued": 1}
    with pytest.raises(ValueError, match="cannot update"):
        store.update_if_active(a.id, nonsense=1)
    store.probe_write()
    store.delete(b.id)
    assert store.get(b.id) is None


def test_a_lease_that_runs_out_returns_the_job_and_the_old_holder_cannot_finish_it(store) -> None:
    rec = job()
    store.add(rec)
    first = store.claim(rec.id, "replica-a", lease_s=1.0)
    assert first is not None and first.attempt == 1 and first.replica == "replica-a"
    assert store.claim(rec.id, "replica-b", lease_s=1.0) is None  # held
    assert store.update_if_leased(rec.id, "replica-a", 1, status="running", progress_step=1, progress_total=4)
    assert store.requeue_expired() == []  # not yet
    time.sleep(1.3)  # replica-a "died": it stopped renewing
    assert store.requeue_expired() == [rec.id]
    back = store.get(rec.id)
    assert back.status == "queued" and back.replica is None and back.progress_step == 0 and back.started is None
    assert store.renew("replica-a", [rec.id], 1.0) == set()  # a stalled holder learns it lost the job
    second = store.claim(rec.id, "replica-b", lease_s=30.0)
    assert second is not None and second.attempt == 2
    # The first holder waking up late can neither report progress nor finish it.
    assert not store.update_if_leased(rec.id, "replica-a", 1, status="succeeded", finished=time.time())
    assert not store.update_if_leased(rec.id, "replica-b", 1, status="succeeded")  # right owner, wrong attempt
    assert store.renew("replica-b", [rec.id], 30.0) == {rec.id}
    assert store.update_if_leased(rec.id, "replica-b", 2, status="succeeded", finished=time.time())
    done = store.get(rec.id)
    assert done.status == "succeeded" and done.replica == "replica-b" and done.attempt == 2
    assert store.holder(rec.id) == (None, None)
    events = [(e["event"], e["attempt"], e["replica"]) for e in store.events(rec.id)]
    assert events == [("claimed", 1, "replica-a"), ("lease_expired", 1, None), ("claimed", 2, "replica-b"),
                      ("succeeded", 2, "replica-b")]


def test_a_finished_job_is_never_completed_twice(store) -> None:
    rec = job()
    store.add(rec)
    store.claim(rec.id, "replica-a", lease_s=30.0)
    assert store.update_if_leased(rec.id, "replica-a", 1, status="succeeded")
    assert not store.update_if_leased(rec.id, "replica-a", 1, status="succeeded")
    assert store.claim(rec.id, "replica-b", lease_s=30.0) is None
    assert not store.update_if_active(rec.id, status="cancelled")
    assert store.requeue_expired() == []
    assert [e["event"] for e in store.events(rec.id)].count("succeeded") == 1


def test_many_replicas_racing_for_one_job_only_one_wins(store) -> None:
    rec = job()
    store.add(rec)
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def race(name: str) -> None:
        barrier.wait()
        if store.claim(rec.id, name, lease_s=30.0) is not None:
            winners.append(name)

    threads = [threading.Thread(target=race, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and store.get(rec.id).replica == winners[0]


def test_cancel_by_the_ingress_ends_the_lease(store) -> None:
    rec = job()
    store.add(rec)
    store.claim(rec.id, "replica-a", lease_s=30.0)
    assert store.update_if_active(rec.id, status="cancelled", error_code="cancelled")
    assert store.renew("replica-a", [rec.id], 30.0) == set()
    assert not store.update_if_leased(rec.id, "replica-a", 1, status="succeeded")
    assert store.get(rec.id).status == "cancelled"


def test_unclaimed_jobs_and_replica_heartbeats(store) -> None:
    a, b = job(), job(created=time.time() + 1)
    store.add(a)
    store.add(b)
    store.claim(a.id, "replica-a", lease_s=30.0)
    assert store.unclaimed() == [b.id]
    store.replica_heartbeat("replica-a", {"ready": True, "queue_depth": 1})
    listed = store.replicas(max_age_s=10)
    assert [r["id"] for r in listed] == ["replica-a"] and listed[0]["ready"] is True and listed[0]["age_s"] >= 0
    time.sleep(0.3)
    assert store.replicas(max_age_s=0.1) == []
    store.remove_replica("replica-a")
    assert store.replicas(max_age_s=10) == []


def test_idempotency_keys(store) -> None:
    first = job(owner="client-aaaa", idempotency_key="order-1")
    store.add(first)
    with pytest.raises(DuplicateJob) as info:
        store.add(job(owner="client-aaaa", idempotency_key="order-1"))
    assert info.value.existing.id == first.id
    store.add(job(owner="client-bbbb", idempotency_key="order-1"))  # another client's key space
    store.add(job(idempotency_key="order-1"))
    with pytest.raises(DuplicateJob):
        store.add(job(idempotency_key="order-1"))  # keys sent without a client id collide too
    store.add(job())
    store.add(job())  # no key: never a duplicate
    assert store.find_by_key("order-1", "client-aaaa").id == first.id
    assert store.find_by_key("order-2", "client-aaaa") is None


def test_sqlite_store_has_the_same_idempotency_rules(tmp_path: Path) -> None:
    s = JobStore(tmp_path)
    try:
        first = job(idempotency_key="k1")
        s.add(first)
        with pytest.raises(DuplicateJob) as info:
            s.add(job(idempotency_key="k1"))
        assert info.value.existing.id == first.id
        s.add(job(idempotency_key="k1", owner="client-cccc"))
    finally:
        s.close()


def test_migrations_upgrade_an_old_schema_and_refuse_a_newer_one(url: str, tmp_path: Path) -> None:
    import psycopg
    from psycopg.rows import dict_row

    from foleyserve.server.pg_jobs import PG_SCHEMA_VERSION, PgJobStore, migrate

    old = job()
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        assert migrate(conn, target=1) == 0
        conn.execute("INSERT INTO jobs (id, status, priority, params, created) VALUES (%s, 'queued', 'bulk', %s, %s)",
                     (old.id, '{"prompt": "old"}', old.created))
    s = PgJobStore(url, tmp_path)
    try:
        got = s.get(old.id)
        assert got.params == {"prompt": "old"} and got.attempt == 0 and got.idempotency_key is None
        assert s.claim(old.id, "replica-a", 5.0).attempt == 1
    finally:
        s.close()
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        versions = [r["version"] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, PG_SCHEMA_VERSION + 1))
        assert migrate(conn) == PG_SCHEMA_VERSION  # nothing left to do
        conn.execute("INSERT INTO schema_migrations (version, applied) VALUES (%s, 0)", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer foleyserve"):
        PgJobStore(url, tmp_path)


def test_replicas_starting_together_migrate_once(url: str, tmp_path: Path) -> None:
    from foleyserve.server.pg_jobs import PgJobStore

    stores, errors = [], []

    def open_one() -> None:
        try:
            stores.append(PgJobStore(url, tmp_path, pool_size=2))
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors and len(stores) == 4


def test_retention_and_result_files(store) -> None:
    old = job(status="succeeded")
    store.add(old)
    name = f"{old.id}.a1.wav"
    store.result_path(name).write_bytes(b"x" * 100)
    store.update(old.id, finished=time.time() - 7200, files={"audio": name}, result_bytes=100)
    assert store.enforce_retention(max_age_s=3600, max_bytes=None) == [old.id]
    assert not store.result_path(name).exists() and store.get(old.id).expired is not None
    other = job()
    store.result_path(f"{other.id}.a2.wav").write_bytes(b"y")
    store.result_path(f"{other.id}_seed3.a2.wav").write_bytes(b"y")
    store.remove_results(other.id)
    assert list(store.results_dir.iterdir()) == []
