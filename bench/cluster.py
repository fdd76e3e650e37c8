"""Scale out on Ray Serve (issue 13) on this machine: jobs per second with 1 and 2 engine replicas
of the demo model, and the time from a replica's death to its jobs running elsewhere.

Everything local, as in tests/test_cluster.py: a Ray head, PostgreSQL and Redis started here.
Both configurations get the same cores (1 replica x 2 CPUs, 2 replicas x 1 CPU), so the numbers
compare replicas, not hardware; on a 2-core machine two replicas cannot be twice as fast.

    python bench/cluster.py --out bench/results/cluster_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from postgres_server import remove, start_postgres  # noqa: E402
from redis_server import free_port, start_redis  # noqa: E402

from foleyserve.config import EngineConfig  # noqa: E402
from foleyserve.pipeline.demo import demo_precision  # noqa: E402
from foleyserve.server import ray_app  # noqa: E402
from foleyserve.server.pg_jobs import PgJobStore  # noqa: E402
from foleyserve.server.settings import ServerConfig  # noqa: E402

FINAL = ("succeeded", "failed", "cancelled")


def make_clip(seconds: float = 1.2) -> bytes:
    from test_server import make_clip as make

    return make(seconds)


def submit_all(client: httpx.Client, clip: bytes, n: int, steps: int, seed0: int) -> list[str]:
    ids = []
    for i in range(n):
        r = client.post("/v1/generations", files={"video": ("c.mp4", clip, "video/mp4")},
                        data={"steps": str(steps), "seed": str(seed0 + i), "output": "wav"})
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def wait_all(client: httpx.Client, ids: list[str], timeout_s: float = 600) -> dict[str, dict]:
    """Poll the recent-jobs list (one request for all jobs, every 0.1 s): polling each job would
    cost the ingress more CPU than the replicas on a 2-core machine."""
    done: dict[str, dict] = {}
    wanted = set(ids)
    deadline = time.monotonic() + timeout_s
    while len(done) < len(ids):
        for body in client.get("/v1/generations", params={"limit": 100}).json()["items"]:
            if body["id"] in wanted and body["status"] in FINAL:
                done[body["id"]] = body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(done)} jobs unfinished")
        time.sleep(0.1)
    return done


def throughput(url: str, clip: bytes, *, jobs: int, steps: int, rounds: int, seed0: int) -> dict:
    client = httpx.Client(base_url=url, timeout=60)
    submit_all(client, clip, 2, steps, seed0 - 100)  # warm each path once (first-call costs)
    time.sleep(0.1)
    per_round = []
    used = []
    for r in range(rounds):
        t0 = time.perf_counter()
        ids = submit_all(client, clip, jobs, steps, seed0 + r * jobs)
        bodies = wait_all(client, ids)
        elapsed = time.perf_counter() - t0
        assert all(b["status"] == "succeeded" for b in bodies.values()), [b for b in bodies.values() if b["status"] != "succeeded"][:1]
        per_round.append(jobs / elapsed)
        used.append(len({b["replica"] for b in bodies.values()}))
    client.close()
    return {"jobs_per_s": [round(x, 3) for x in per_round], "median_jobs_per_s": round(statistics.median(per_round), 3),
            "replicas_used": used}


def failover(url: str, store: PgJobStore, clip: bytes, *, jobs: int, steps: int, rounds: int, seed0: int,
             how: str = "kill") -> dict:
    """Kill (SIGKILL: Ray sees the death) or freeze (SIGSTOP: only the lease tells) the replica
    running a job; time until each of its jobs is claimed again, and until all jobs end."""
    client = httpx.Client(base_url=url, timeout=60)
    to_reclaim, to_done, lost, twice = [], [], 0, 0
    for r in range(rounds):
        ray_app.wait_ready(url, 240, replicas=2)
        time.sleep(3.5)  # let the dead replica's heartbeat age out of the list
        ids = submit_all(client, clip, jobs, steps, seed0 + 1000 * r)
        victim = None
        while victim is None:
            for b in client.get("/v1/generations", params={"limit": 100}).json()["items"]:
                if b["id"] in ids and b["status"] == "running" and b["progress"]["step"] > 0:
                    victim = b["replica"]
                    break
            time.sleep(0.05)
        info = client.get("/v1/info").json()["replicas"]
        pid = next(x["pid"] for x in info if x["id"] == victim)
        held = [j for j in ids if store.holder(j)[0] == victim]
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        killed = time.time()
        try:
            bodies = wait_all(client, ids)
        finally:
            if how != "kill":
                os.kill(pid, signal.SIGCONT)
        finished = time.time()
        events = store.events()
        for job_id in held:
            claims = [e["at"] for e in events if e["job_id"] == job_id and e["event"] == "claimed" and e["at"] > killed]
            if claims:
                to_reclaim.append(min(claims) - killed)
        to_done.append(finished - killed)
        lost += sum(1 for b in bodies.values() if b["status"] != "succeeded")
        twice += sum(1 for j in ids if [e["event"] for e in events if e["job_id"] == j].count("succeeded") != 1)
    client.close()
    return {
        "death_to_reclaimed_s": [round(x, 3) for x in to_reclaim],
        "median_death_to_reclaimed_s": round(statistics.median(to_reclaim), 3) if to_reclaim else None,
        "death_to_all_done_s": [round(x, 2) for x in to_done],
        "median_death_to_all_done_s": round(statistics.median(to_done), 2),
        "jobs_lost": lost, "jobs_completed_twice": twice,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lease-seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="foleyserve-bench-cluster-"))
    pg = start_postgres()
    redis = start_redis(scratch)
    clip = make_clip()
    engine = EngineConfig(demo=True, device="cpu", precision=demo_precision("cpu")[0])
    results: dict = {}
    cores = os.cpu_count() or 2
    try:
        ray.init(address="local", num_cpus=cores, object_store_memory=200 * 2**20, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "src")}})
        for replicas in (1, 2):
            db = pg.create_database()
            server = ServerConfig(
                host="127.0.0.1", port=free_port(), data_dir=scratch / f"shared{replicas}", database_url=db,
                cache="off", replicas=replicas, replica_cpus=cores / replicas, lease_seconds=args.lease_seconds,
                max_batch_size=4, max_wait_ms=10.0, log_level="warning",
            )
            url = ray_app.start(server, engine)
            ray_app.wait_ready(url, 240, replicas=replicas)
            load_before = os.getloadavg()[0]
            t = throughput(url, clip, jobs=args.jobs, steps=args.steps, rounds=args.rounds, seed0=10_000 * replicas)
            # The machine is shared: the 1-minute load average says how much else was running.
            results[f"replicas_{replicas}"] = {"cpus_per_replica": cores / replicas, **t,
                                               "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            print(f"{replicas} replica(s): {t['median_jobs_per_s']} jobs/s {t}", flush=True)
            if replicas == 2:
                store = PgJobStore(db, server.data_dir, pool_size=2)
                f = failover(url, store, clip, jobs=12, steps=16, rounds=args.rounds, seed0=50_000)
                results["failover"] = f
                print(f"failover: {f}", flush=True)
                f = failover(url, store, clip, jobs=12, steps=16, rounds=3, seed0=90_000, how="stop")
                results["failover_stalled"] = f
                print(f"stalled: {f}", flush=True)
                store.close()
            ray_app.stop()
    finally:
        ray.shutdown()
        redis.stop()
        remove(pg)
        shutil.rmtree(scratch, ignore_errors=True)
    one, two = results["replicas_1"]["median_jobs_per_s"], results["replicas_2"]["median_jobs_per_s"]
    report = {
        "benchmark": "cluster", "date": "2026-11-30",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "python": platform.python_version(),
                    "ray": ray.__version__},
        "command": "python bench/cluster.py " + " ".join(sys.argv[1:]),
        "workload": {"model": "demo (random weights)", "clip": "1.2 s 64x48 H.264", "steps": args.steps,
                     "jobs_per_round": args.jobs, "rounds": args.rounds, "cache": "off", "max_batch_size": 4,
                     "lease_seconds": args.lease_seconds, "failover_jobs": 12, "failover_steps": 16,
                     "failover": "SIGKILL of the replica running a job (Ray reports the death to the ingress)",
                     "failover_stalled": "SIGSTOP of it (alive to Ray, silent: only the lease runs out), SIGCONT after"},
        "results": results, "speedup_2_vs_1": round(two / one, 3),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
