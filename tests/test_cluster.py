"""Scale out on Ray Serve (issue 13), end to end on this machine: a local Ray head with an ingress
and two CPU engine replicas of the demo model, a real PostgreSQL and a real Redis, all on loopback.

One application serves the whole module (starting it costs ~20 s); the tests run in order:
20 jobs over both replicas, the shared Redis cache, a cancel that reaches the replica, a replica
killed mid-job (no job lost, none finished twice), the web page through the ingress, and a
restart of the whole application that keeps the finished jobs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")
httpx = pytest.importorskip("httpx")

from postgres_server import postgres_bin_dir, remove, start_postgres  # noqa: E402
from redis_server import free_port, redis_server_binary, start_redis  # noqa: E402

if postgres_bin_dir() is None:
    pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)", allow_module_level=True)
if redis_server_binary() is None:
    pytest.skip("redis-server not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 150.0
FINAL = ("succeeded", "failed", "cancelled")


class Cluster:
    def __init__(self, url: str, store: Any, data_dir: Path, redis: Any, server_config: Any, engine_config: Any) -> None:
        self.url, self.store, self.data_dir, self.redis = url, store, data_dir, redis
        self.server_config, self.engine_config = server_config, engine_config
        self.client = httpx.Client(base_url=url, timeout=60)
        self.finished: dict[str, dict] = {}  # job id -> body, for the restart test

    def submit(self, clip: bytes, headers: dict | None = None, **fields: Any) -> httpx.Response:
        data = {"steps": "4", "output": "wav", **{k: str(v) for k, v in fields.items()}}
        return self.client.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")}, data=data,
                                headers=headers or {})

    def body(self, job_id: str) -> dict:
        return self.client.get(f"/v1/generations/{job_id}").json()

    def wait_all(self, ids: list[str], deadline_s: float = DEADLINE_S) -> dict[str, dict]:
        deadline = time.monotonic() + deadline_s
        done: dict[str, dict] = {}
        while len(done) < len(ids):
            # One listing for the jobs submitted without a client id (cheap for the ingress, which
            # shares the two cores with the replicas), then the rest one by one.
            for b in self.client.get("/v1/generations", params={"limit": 100}).json()["items"]:
                if b["id"] in ids and b["status"] in FINAL:
                    done[b["id"]] = b
            for job_id in ids:
                if job_id not in done and len(ids) - len(done) <= 2:
                    b = self.body(job_id)
                    if b["status"] in FINAL:
                        done[job_id] = b
            assert time.monotonic() < deadline, f"{len(ids) - len(done)} job(s) never finished: " + str(
                [self.body(j) for j in ids if j not in done][:2])
            time.sleep(0.15)
        return done

    def replicas(self) -> list[dict]:
        return self.client.get("/v1/info").json()["replicas"]


def _start(cluster_config: dict) -> str:
    from foleyserve.server import ray_app

    return ray_app.start(cluster_config["server"], cluster_config["engine"], init={
        "num_cpus": 2, "object_store_memory": 200 * 2**20, "log_to_driver": False,
        # Workers import this checkout's code, like the tests do (conftest puts src/ first).
        "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}},
    })


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import ray

    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.demo import demo_precision
    from foleyserve.server import ray_app
    from foleyserve.server.pg_jobs import PgJobStore
    from foleyserve.server.settings import ServerConfig

    scratch = Path(tempfile.mkdtemp(prefix="foleyserve-cluster-"))
    pg = start_postgres()
    redis = start_redis(scratch)
    try:
        db = pg.create_database()
        data_dir = scratch / "shared"  # stands in for the NFS/EFS mount every replica sees
        server = ServerConfig(
            host="127.0.0.1", port=free_port(), data_dir=data_dir, database_url=db, cache=redis.url, replicas=2,
            lease_seconds=6.0, max_batch_size=2, max_wait_ms=5.0, log_level="warning", max_prompt_chars=20000,
            shutdown_grace_s=1.0,
        )
        engine = EngineConfig(demo=True, device="cpu", precision=demo_precision("cpu")[0])
        config = {"server": server, "engine": engine}
        url = _start(config)
        ray_app.wait_ready(url, 240, replicas=2)
        store = PgJobStore(db, data_dir, pool_size=2)
        c = Cluster(url, store, data_dir, redis, server, engine)
        c.config = config  # type: ignore[attr-defined]
        yield c
        c.client.close()
        store.close()
    finally:
        try:
            ray_app.stop()
        except Exception:
            pass
        ray.shutdown()
        redis.stop()
        remove(pg)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def clip() -> bytes:
    from test_server import make_clip

    return make_clip(1.2)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_delivered_once(cluster: Cluster, bodies: dict[str, dict]) -> None:
    """Every job succeeded exactly once: one 'succeeded' event, only the winning attempt's files in
    the shared folder, and the served bytes are the ones the row's checksum describes."""
    events = cluster.store.events()
    for job_id, body in bodies.items():
        assert body["status"] == "succeeded", body
        mine = [e for e in events if e["job_id"] == job_id]
        assert [e["event"] for e in mine].count("succeeded") == 1, mine
        rec = cluster.store.get(job_id)
        on_disk = {p.name for p in cluster.store.results_dir.glob(f"{job_id}*")}
        assert on_disk == set(rec.files.values()), (on_disk, rec.files)
        audio = cluster.client.get(body["audio_url"])
        assert audio.status_code == 200
        size, digest = rec.checksums[rec.files["audio"]]
        assert len(audio.content) == size and sha256(audio.content) == digest


def lost_by(cluster: Cluster, victim: str, ids: list[str], when: float) -> set[str]:
    """The jobs ``victim`` had claimed before ``when`` and did not finish (it may have finished a
    few in the instant between being chosen and being signalled)."""
    held = set()
    for job_id in ids:
        events = cluster.store.events(job_id)
        claimed = [e for e in events if e["event"] == "claimed" and e["at"] <= when]
        won = [e for e in events if e["event"] == "succeeded"]
        if claimed and claimed[-1]["replica"] == victim and not (won and won[0]["replica"] == victim):
            held.add(job_id)
    return held


# ------------------------------------------------------------------------------------- tests


def test_twenty_jobs_use_both_replicas(cluster: Cluster, clip: bytes) -> None:
    ready = cluster.client.get("/readyz")
    assert ready.status_code == 200 and len(ready.json()["replicas"]) == 2
    health = cluster.client.get("/healthz").json()
    assert health["status"] == "ok" and {r["ready"] for r in health["replicas"]} == {True}
    info = cluster.client.get("/v1/info").json()
    assert info["demo"] is True and info["ready"] is True
    assert {r["device"] for r in info["replicas"]} == {"cpu"} and len({r["pid"] for r in info["replicas"]}) == 2

    ids = []
    for i in range(20):
        r = cluster.submit(clip, seed=100 + i, prompt=f"job {i}")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    bodies = cluster.wait_all(ids)
    replicas = {b["replica"] for b in bodies.values()}
    assert len(replicas) == 2, replicas  # queue-depth routing spread the load
    # Attempt 1 unless the machine was so busy that a heartbeat missed a whole lease (then the
    # job moved, which is allowed; it still finished once).
    assert sum(b["attempt"] == 1 for b in bodies.values()) >= 18, [b["attempt"] for b in bodies.values()]
    check_delivered_once(cluster, bodies)
    cluster.finished.update(bodies)


def test_idempotency_key_through_the_ingress(cluster: Cluster, clip: bytes) -> None:
    headers = {"Idempotency-Key": "order-4711", "X-Client-Id": "client-idem-0001"}
    first = cluster.submit(clip, headers=headers, seed=7)
    again = cluster.submit(clip, headers=headers, seed=7)
    assert first.status_code == 202 and again.status_code in (200, 202)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    bad = cluster.submit(clip, headers={"Idempotency-Key": "bad key with spaces"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
    cluster.wait_all([first.json()["id"]])


def test_a_prompt_over_claps_limit_is_422_at_the_ingress(cluster: Cluster, clip: bytes) -> None:
    before = cluster.store.counts()
    r = cluster.submit(clip, prompt="rain " * 3000)
    assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long" and "tokens" in r.json()["error"]["message"]
    assert cluster.store.counts() == before  # nothing was queued


def test_the_redis_cache_serves_every_replica(cluster: Cluster, clip: bytes) -> None:
    # A job that repeats an earlier one (same clip, prompt, seed, steps) is answered from the
    # shared result cache, whichever replica gets it.
    again = [cluster.submit(clip, seed=100 + i, prompt=f"job {i}").json()["id"] for i in range(4)]
    bodies = cluster.wait_all(again)
    assert all(b["cache_hit"] and b["status"] == "succeeded" for b in bodies.values()), bodies
    assert cluster.redis.client().dbsize() > 0


def test_cancel_reaches_the_replica(cluster: Cluster, clip: bytes) -> None:
    job_id = cluster.submit(clip, steps=1000, seed=5).json()["id"]
    deadline = time.monotonic() + 60
    while (b := cluster.body(job_id))["status"] != "running" or b["progress"]["step"] == 0:
        assert time.monotonic() < deadline, b
        time.sleep(0.05)
    holder = b["replica"]
    assert cluster.client.delete(f"/v1/generations/{job_id}").json()["status"] == "cancelled"
    # The holder notices at its next lease renewal and drops the job.
    deadline = time.monotonic() + 20
    while any(r["id"] == holder and r["running"] for r in cluster.replicas()):
        assert time.monotonic() < deadline, cluster.replicas()
        time.sleep(0.2)
    assert cluster.body(job_id)["status"] == "cancelled"
    events = [e["event"] for e in cluster.store.events(job_id)]
    assert events[0] == "claimed" and events[-1] == "cancelled" and "succeeded" not in events, events


def test_a_killed_replica_loses_no_job(cluster: Cluster, clip: bytes) -> None:
    ids = [cluster.submit(clip, steps=16, seed=500 + i, prompt="kill").json()["id"] for i in range(20)]
    deadline = time.monotonic() + 90
    victim = None
    while victim is None:
        for job_id in ids:
            b = cluster.body(job_id)
            if b["status"] == "running" and b["progress"]["step"] > 0:
                victim = b["replica"]
                break
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    pid = next(r["pid"] for r in cluster.replicas() if r["id"] == victim)
    os.kill(pid, signal.SIGKILL)  # the replica's process dies mid-job, without a word
    killed_at = time.time()
    bodies = cluster.wait_all(ids, deadline_s=DEADLINE_S)

    check_delivered_once(cluster, bodies)
    held = lost_by(cluster, victim, ids, killed_at)
    assert held, "the victim held no job when it died"
    for job_id in held:
        b = bodies[job_id]
        assert b["attempt"] >= 2 and b["replica"] != victim, b
        reclaimed = [e["at"] for e in cluster.store.events(job_id) if e["event"] == "claimed" and e["at"] > killed_at - 1]
        assert reclaimed and min(reclaimed) - killed_at < 30, cluster.store.events(job_id)
    cluster.finished.update(bodies)
    # Ray Serve replaces the dead replica.
    from foleyserve.server import ray_app

    ray_app.wait_ready(cluster.url, 120, replicas=2)


def test_a_stalled_replica_loses_its_jobs_and_cannot_finish_them(cluster: Cluster, clip: bytes) -> None:
    # SIGSTOP: the process lives on (Ray sees nothing wrong) but renews no lease. Its jobs go back
    # to the queue when their leases run out and the other replica runs them; once it resumes,
    # its own attempts are refused and its files removed.
    time.sleep(4.5)  # the killed replica's last heartbeat ages out of the list (2/3 of the lease)
    ids = [cluster.submit(clip, steps=16, seed=700 + i, prompt="stall").json()["id"] for i in range(6)]
    deadline = time.monotonic() + 90
    victim = None
    while victim is None:
        for job_id in ids:
            b = cluster.body(job_id)
            if b["status"] == "running" and b["progress"]["step"] > 0:
                victim = b["replica"]
                break
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    pid = next(r["pid"] for r in cluster.replicas() if r["id"] == victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        bodies = cluster.wait_all(ids, deadline_s=DEADLINE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    held = lost_by(cluster, victim, ids, stopped_at)
    assert held
    for job_id in held:
        assert bodies[job_id]["replica"] != victim and bodies[job_id]["attempt"] >= 2, bodies[job_id]
        assert "lease_expired" in [e["event"] for e in cluster.store.events(job_id)]
    # The resumed replica learns at its next renewal (every 2 s) that the jobs are gone, and whatever it
    # finishes meanwhile is refused: its staged and published files disappear.
    # While it was stopped its heartbeat aged out of the list, so wait until it is listed again
    # (a heartbeat written after SIGCONT) and holds nothing.
    deadline = time.monotonic() + 20
    while not any(r["id"] == victim and r["running"] == 0 for r in cluster.replicas()):
        assert time.monotonic() < deadline, cluster.replicas()
        time.sleep(0.2)
    check_delivered_once(cluster, bodies)
    # Its refused attempts' staged files go when its publish is refused, which can land just after
    # the heartbeat that lists it idle: wait for them (bounded), they must not stay.
    staging = cluster.store.results_dir / ".staging"
    deadline = time.monotonic() + 20
    while staging.is_dir() and (left := [p for p in staging.glob("*") if p.name.split(".")[0] in ids]):
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
    cluster.finished.update(bodies)


def test_the_web_page_works_through_the_ingress(cluster: Cluster) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    from test_webpage import CHROMIUM, CHROMIUM_ARGS

    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from foleyserve.pipeline.demo import sample_clip_path

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(90_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(cluster.url + "/")
            page.wait_for_selector("body[data-limits=server]")
            page.set_input_files("[data-testid=video-input]", str(sample_clip_path()))
            page.fill("[data-testid=prompt]", "footsteps through ray")
            page.fill("[data-testid=steps]", "3")
            with page.expect_response(lambda r: r.request.method == "POST" and "/v1/generations" in r.url) as posted:
                page.click("[data-testid=generate]")
            assert posted.value.status == 202, posted.value.text()
            job_id = posted.value.json()["id"]
            page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('Done')")
            page.locator("[data-testid=result-video]").wait_for(state="visible")
            page.wait_for_selector("[data-testid=waveform][data-drawn=true]")
            assert errors == []
        finally:
            browser.close()
    body = cluster.body(job_id)
    assert body["status"] == "succeeded" and body["replica"]


def test_a_restart_of_the_whole_application_keeps_finished_jobs(cluster: Cluster, clip: bytes) -> None:
    from foleyserve.server import ray_app

    assert len(cluster.finished) >= 20
    before = {j: cluster.client.get(b["audio_url"]).content for j, b in list(cluster.finished.items())[:5]}
    # A job running when the application stops: Ray Serve drains the replica (the job may finish
    # there); what it still holds when the drain ends goes back to the queue for the new replicas.
    running = cluster.submit(clip, steps=400, seed=31).json()["id"]
    deadline = time.monotonic() + 60
    while cluster.body(running)["progress"]["step"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ray_app.stop()
    cut_short = cluster.store.get(running).status in ("queued", "preparing", "running")  # else it beat the grace
    cluster.client.close()
    url = _start(cluster.config)  # type: ignore[attr-defined]
    ray_app.wait_ready(url, 240, replicas=2)
    cluster.client = httpx.Client(base_url=url, timeout=60)
    for job_id, old in cluster.finished.items():
        now = cluster.body(job_id)
        assert now["status"] == "succeeded" and now["replica"] == old["replica"] and now["audio_url"], now
    for job_id, audio in before.items():
        assert cluster.client.get(cluster.finished[job_id]["audio_url"]).content == audio
    # New replicas, new jobs, and the interrupted one finished by one of them.
    job_id = cluster.submit(clip, seed=9).json()["id"]
    bodies = cluster.wait_all([job_id, running])
    assert bodies[job_id]["status"] == "succeeded"
    assert bodies[running]["status"] == "succeeded", bodies[running]
    assert bodies[running]["attempt"] >= 2 or not cut_short, bodies[running]
    check_delivered_once(cluster, {running: bodies[running]})
