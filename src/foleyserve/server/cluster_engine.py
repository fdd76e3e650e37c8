"""One engine replica of a scaled-out server: its own engine, cache client and batcher, running
the jobs it claims from the shared PostgreSQL store.

The replica reuses :class:`~foleyserve.server.service.Service` (progress, final states, failure
wording, metrics) with three changes:

* every write to a job goes through :class:`LeaseView`, which applies it only while this replica
  holds the job's lease for the current attempt, so a replica that lost a job (cancelled, or
  presumed dead and handed to another) cannot change its outcome;
* results are written into a per-attempt staging folder, then renamed into the shared results
  folder under names that carry the attempt (``<id>.a2.wav``): a rename is atomic, two attempts
  never write the same file, and the checksums recorded with the final state are of the bytes
  that stay;
* a heartbeat thread renews the leases, stops jobs whose lease is gone, and reports the replica's
  state (the ingress lists it in /v1/info and /readyz).

No Ray here: the Ray Serve deployment (server/ray_app.py) wraps this class, and the tests could
drive it without Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from foleyserve.pipeline.requests import GenerationRequest, RequestError
from foleyserve.server.jobs import FINAL_STATUSES, JobRecord
from foleyserve.server.results import rank_of, seeds_of, write_files
from foleyserve.server.service import Service, unlink
from foleyserve.server.settings import ServerConfig

log = logging.getLogger("foleyserve.server")

STAGING = ".staging"


def published_name(name: str, attempt: int) -> str:
    """``<id>.wav`` -> ``<id>.a2.wav``: the shared folder's name of an attempt's file."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.a{attempt}.{suffix}" if dot else f"{name}.a{attempt}"


class _Folder:
    """A ``store.result_path`` stand-in that points into a staging folder (for write_files)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def result_path(self, name: str) -> Path:
        return self.path / Path(name).name


class LeaseView:
    """The PostgreSQL store as one replica may use it: job writes only under its lease."""

    def __init__(self, store: Any, owner: str, attempts: dict[str, int], lock: threading.Lock) -> None:
        self._store, self._owner, self._attempts, self._lock = store, owner, attempts, lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _attempt(self, job_id: str) -> int | None:
        with self._lock:
            return self._attempts.get(job_id)

    def update_if_active(self, job_id: str, **changes: Any) -> bool:
        attempt = self._attempt(job_id)
        if attempt is None:
            return False
        return self._store.update_if_leased(job_id, self._owner, attempt, **changes)

    def staging_dir(self, job_id: str, attempt: int) -> Path:
        return self._store.results_dir / STAGING / f"{job_id}.a{attempt}"

    def remove_results(self, job_id: str) -> None:
        """Only this attempt's files: another attempt's (maybe the one that counts) stay."""
        attempt = self._attempt(job_id)
        if attempt is None:
            return
        shutil.rmtree(self.staging_dir(job_id, attempt), ignore_errors=True)
        for pattern in (f"{job_id}.a{attempt}.*", f"{job_id}_seed*.a{attempt}.*"):
            for p in self._store.results_dir.glob(pattern):
                unlink(p)

    def close(self) -> None:
        pass  # the replica closes the real store after its last write


class _Alias:
    """A batcher job seen under the job's own id (the batcher knows it as ``<id>.a<attempt>``, so
    that a job this replica ran before, under an earlier attempt, is no clash)."""

    def __init__(self, job: Any, job_id: str) -> None:
        self._job, self.id = job, job_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)


class ReplicaService(Service):
    """A Service whose jobs come from :meth:`take` (a claim in PostgreSQL), not from HTTP."""

    def __init__(self, config: ServerConfig, engine_config: Any, engine: Any | None, *, replica_id: str) -> None:
        if not config.database_url:
            raise ValueError("an engine replica needs the shared job database (database_url)")
        super().__init__(config, engine_config, engine)
        self.replica_id = replica_id
        self.pg = self.store
        self._attempts: dict[str, int] = {}
        self._done: dict[str, threading.Event] = {}
        self._held_lock = threading.Lock()
        self.store = LeaseView(self.pg, replica_id, self._attempts, self._held_lock)
        self.lease_s = float(config.lease_seconds)
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="foleyserve-lease", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        """Finish or cut short the running batch, then hand every job still held back to the queue
        at once (no waiting for the lease to run out)."""
        super().stop()
        self._beat_stop.set()
        with self._held_lock:
            held = list(self._attempts)
            batch_ids = [f"{job_id}.a{attempt}" for job_id, attempt in self._attempts.items()]
        if self.batcher is not None:
            for batch_id in batch_ids:  # past the grace period: cut short (another replica re-runs it)
                self.batcher.cancel(batch_id)
        try:
            if held:
                self.pg.renew(self.replica_id, held, -1.0)  # a lease in the past: re-queued next round
                log.info("shutdown: %d job(s) handed back to the queue", len(held))
            self.pg.remove_replica(self.replica_id)
        except Exception:
            log.exception("handing jobs back on shutdown failed; their leases run out instead")
        self.pg.close()

    def healthy(self) -> str | None:
        """None when the replica can run jobs, else why not (Ray Serve replaces it)."""
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self._beat is not None and not self._beat.is_alive():
            return "the lease heartbeat stopped"
        return None

    def _recover(self) -> None:
        pass  # the ingress re-dispatches what the cluster left unclaimed

    def enforce_retention(self, now: float | None = None) -> list[str]:
        return []  # the ingress owns retention of the shared results

    # -- jobs ------------------------------------------------------------------------------------

    def take(self, job_id: str) -> tuple[str, threading.Event | None]:
        """Claim a job and queue it in this replica's batcher. Returns ("running", done event),
        ("taken", None) when another replica holds it or it is over, or ("busy", None) when this
        batcher is full (the job is left unclaimed for another replica)."""
        from foleyserve.runtime.batcher import QueueFull

        batcher = self.batcher
        if batcher is None or not self.ready.is_set():
            return "busy", None
        rec = self.pg.claim(job_id, self.replica_id, self.lease_s)
        if rec is None:
            return "taken", None
        done = threading.Event()
        with self._held_lock:
            self._attempts[job_id] = rec.attempt
            self._done[job_id] = done
        upload = self.pg.upload_path(job_id)
        if not rec.params.get("text_only") and not upload.is_file():
            self._fail_now(job_id, "interrupted", "the job's upload is gone from the shared storage; submit it again")
            self._forget(job_id)
            return "running", done
        try:
            batcher.submit(self._request_for(rec, upload), priority=rec.priority, job_id=f"{job_id}.a{rec.attempt}",
                           seeds=seeds_of(rec.params), rank=rank_of(rec.params))
        except QueueFull:
            self._give_back(job_id)
            return "busy", None
        except RequestError as e:
            self._fail_now(job_id, "invalid_request", str(e))
            self._forget(job_id)
        return "running", done

    def _give_back(self, job_id: str) -> None:
        self.pg.renew(self.replica_id, [job_id], -1.0)
        with self._held_lock:
            self._attempts.pop(job_id, None)
            self._done.pop(job_id, None)

    def _forget(self, job_id: str) -> None:
        with self._held_lock:
            self._attempts.pop(job_id, None)
            event = self._done.pop(job_id, None)
        if event is not None:
            event.set()

    def _request_for(self, rec: JobRecord, upload: Path) -> GenerationRequest:
        req = super()._request_for(rec, upload)
        staging = self.store.staging_dir(rec.id, rec.attempt)
        staging.mkdir(parents=True, exist_ok=True)
        req.output = staging / f"{rec.id}.{rec.params['output']}"
        return req

    def _on_update(self, job: Any) -> None:
        real_id = str(job.id).rsplit(".a", 1)[0]
        super()._on_update(_Alias(job, real_id))
        if job.status in FINAL_STATUSES:
            with self._held_lock:
                attempt = self._attempts.get(real_id)
            if attempt is not None:
                # Published files left it already; what is left belongs to an attempt that lost.
                shutil.rmtree(self.store.staging_dir(real_id, attempt), ignore_errors=True)
            self._forget(real_id)

    def _release_upload(self, job_id: str, written: bool | None) -> None:
        # A refused write here means the job went to another replica, which may still read it.
        if written:
            unlink(self.pg.upload_path(job_id))

    def _write_results(self, job: Any, rec: JobRecord) -> dict[str, str]:
        """Write into this attempt's staging folder, then rename each file into the shared
        results folder under its attempt's name (atomic on one file system, NFS included)."""
        with self._held_lock:
            attempt = self._attempts[job.id]
        staging = self.store.staging_dir(job.id, attempt)
        files = write_files(_Folder(staging), job, rec)
        renamed: dict[str, str] = {}
        for name in dict.fromkeys(files.values()):
            final = published_name(name, attempt)
            src = staging / name
            with open(src, "rb+") as f:
                os.fsync(f.fileno())  # the bytes reach the disk before the name does
            os.replace(src, self.pg.result_path(final))
            renamed[name] = final
        _fsync_dir(self.pg.results_dir)
        shutil.rmtree(staging, ignore_errors=True)
        for older in self.pg.results_dir.joinpath(STAGING).glob(f"{job.id}.a*"):
            shutil.rmtree(older, ignore_errors=True)  # left by a replica that died mid-job
        return {key: renamed[name] for key, name in files.items()}

    def cancel_local(self, job_id: str) -> None:
        """Stop a job this replica no longer holds (cancelled by a user, or re-queued)."""
        with self._held_lock:
            attempt = self._attempts.get(job_id)
        if attempt is not None and self.batcher is not None:
            with self._lock:
                self._user_cancelled.add(job_id)
            self.batcher.cancel(f"{job_id}.a{attempt}")

    # -- heartbeat -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the ingress shows about this replica."""
        info = self.engine_info() or {}
        batcher = self.batcher
        with self._held_lock:
            running = len(self._attempts)
        return {
            "ready": self.ready.is_set() and self.healthy() is None,
            "queue_depth": batcher.queue_depth() if batcher is not None else 0,
            "running": running, "model": info.get("model"), "precision": info.get("precision"),
            "device": info.get("device"), "node": socket.gethostname(), "pid": os.getpid(),
        }

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.lease_s / 3)
        while not self._beat_stop.is_set():
            try:
                with self._held_lock:
                    held = list(self._attempts)
                kept = self.pg.renew(self.replica_id, held, self.lease_s)
                for job_id in set(held) - kept:
                    with self._held_lock:
                        still = job_id in self._attempts
                    if still:  # not just finished: cancelled or re-queued behind our back
                        log.info("job %s: lease lost (cancelled or handed to another replica); stopping it here", job_id)
                        self.cancel_local(job_id)
                self.pg.replica_heartbeat(self.replica_id, self.describe())
            except Exception:
                log.exception("renewing leases failed; will retry")
            self._beat_stop.wait(interval)

    async def wait(self, done: threading.Event, poll_s: float = 0.05) -> None:
        """Wait (without a thread) until a job taken by :meth:`take` has ended here."""
        while not done.is_set():
            await asyncio.sleep(poll_s)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on a directory; the rename still stands
    finally:
        os.close(fd)
