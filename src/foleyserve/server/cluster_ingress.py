"""The API side of a scaled-out server: the same routes (server/app.py), with the jobs run by
engine replicas instead of an in-process batcher.

:class:`IngressService` is the :class:`~foleyserve.server.service.Service` the routes talk to; its
``batcher`` is a :class:`Dispatcher`, which hands each job id to the engine deployment (Ray Serve
routes the call to the replica with the fewest ongoing requests, i.e. the shortest queue) and keeps
the shared queue honest:

* a job whose replica died is noticed twice over: the call to that replica fails (its lease is
  ended at once), and, failing that, its lease runs out; either way the job goes back to the queue
  and is dispatched again;
* jobs nobody holds (the ingress restarted, a replica handed its jobs back on shutdown, a dispatch
  was lost) are dispatched again every few seconds;
* readiness, queue depth and the replica list come from the replicas' heartbeats in PostgreSQL.

No Ray import here: ``dispatch`` is any coroutine function taking a job id (server/ray_app.py
passes one that calls the engine deployment's handle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Awaitable, Callable

from foleyserve.server.service import Service
from foleyserve.server.settings import ServerConfig

log = logging.getLogger("foleyserve.server")

TICK_S = 0.25
# Unclaimed jobs are swept and re-dispatched this often (a dispatch in flight is never repeated).
SWEEP_S = 3.0
# A dispatch that failed (no replica yet, a replica died before claiming) is retried after this.
RETRY_S = 1.0
# How long the first submission waits for a replica to send its tokenizer.
PROMPT_CHECK_S = 10.0


class Dispatcher:
    """Presents the batcher interface the routes use (submit, cancel, get, queue_depth,
    retry_after, stop) over the engine deployment. Runs its own event loop thread, so handle calls
    and their failures are awaited without tying up a thread per job."""

    def __init__(self, service: "IngressService", dispatch: Callable[[str], Awaitable[Any]],
                 is_replica_death: Callable[[BaseException], bool] = lambda e: False) -> None:
        self.service = service
        self.store = service.store
        self._dispatch_fn = dispatch
        self._is_death = is_replica_death
        self._loop = asyncio.new_event_loop()
        # job id -> the token of its newest dispatch (a re-queued job gets a new one even while an
        # older call hangs on a stalled replica).
        self._inflight: dict[str, int] = {}
        self._tokens = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foleyserve-dispatch", daemon=True)
        self._depth = 0
        self._replicas: list[dict[str, Any]] = []
        self._finished: list[float] = []  # monotonic times of dispatches that ended, for Retry-After
        self.redispatched = 0

    # -- the batcher interface -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, request: Any, *, priority: str = "interactive", job_id: str | None = None, **_: Any) -> None:
        """The job is in the store already; send its id to a replica."""
        if job_id is None:
            raise ValueError("a clustered job needs its id")
        self._loop.call_soon_threadsafe(self._dispatch, job_id)

    def cancel(self, job_id: str) -> bool:
        return False  # the service ends the row; the holder's next lease renewal stops it

    def get(self, job_id: str) -> None:
        return None  # progress is in the store (replicas write it every 0.2 s)

    def queue_depth(self) -> int:
        return self._depth

    def retry_after(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._finished if now - t < 60]
        rate = len(recent) / 60 if recent else 0.0
        return max(1.0, min(300.0, self._depth / rate)) if rate > 0 else 10.0

    def replicas(self) -> list[dict[str, Any]]:
        return list(self._replicas)

    def run(self, coro: Awaitable[Any], timeout_s: float) -> Any:
        """Run a coroutine on the dispatcher's loop from another thread and wait for its answer."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        next_sweep = 0.0
        while not self._stopping.is_set():
            try:
                for job_id in await asyncio.to_thread(self.store.requeue_expired):
                    log.warning("job %s: its replica stopped renewing the lease; back in the queue", job_id)
                    self.redispatched += 1
                    self._dispatch(job_id, force=True)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_S
                    for job_id in await asyncio.to_thread(self.store.unclaimed):
                        self._dispatch(job_id)
                await asyncio.to_thread(self._refresh)
            except Exception:
                log.exception("the dispatcher's round failed; will retry")
            await asyncio.sleep(TICK_S)
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _refresh(self) -> None:
        """Replica states and the cluster's queue depth from the store."""
        lease = float(self.service.config.lease_seconds)
        replicas = self.store.replicas(max_age_s=max(3.0, lease * 2 / 3))
        self._replicas = replicas
        self._depth = self.store.active_count()
        if any(r.get("ready") for r in replicas):
            self.service.ready.set()
        else:
            self.service.ready.clear()

    def _dispatch(self, job_id: str, force: bool = False) -> None:
        if (job_id in self._inflight and not force) or self._stopping.is_set():
            return
        self._tokens += 1
        self._inflight[job_id] = self._tokens
        self._loop.create_task(self._call(job_id, self._tokens))

    async def _call(self, job_id: str, token: int) -> None:
        retry = False
        try:
            outcome = await self._dispatch_fn(job_id)
            if isinstance(outcome, dict) and outcome.get("status") == "busy":
                retry = True  # that replica's batcher was full; it left the job unclaimed
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self._is_death(e):
                # The replica running this call is gone, and with it the job's lease holder (one
                # dispatch per job is in flight): end the lease now rather than when it runs out.
                log.warning("job %s: its replica died (%s); re-queueing it", job_id, type(e).__name__)
                await asyncio.to_thread(self._end_lease, job_id)
            else:
                log.warning("job %s: dispatch failed (%s: %s); will retry", job_id, type(e).__name__, e)
            retry = True
        finally:
            if self._inflight.get(job_id) == token:
                del self._inflight[job_id]
            self._finished.append(time.monotonic())
            del self._finished[:-256]
        if retry and not self._stopping.is_set():
            await asyncio.sleep(RETRY_S)
            rec = await asyncio.to_thread(self.store.get, job_id)
            holder, _ = await asyncio.to_thread(self.store.holder, job_id)
            if rec is not None and not rec.is_final and holder is None:
                self._dispatch(job_id)

    def _end_lease(self, job_id: str) -> None:
        holder, _ = self.store.holder(job_id)
        if holder is not None:
            self.store.renew(holder, [job_id], -1.0)  # expired: the next round re-queues it


class IngressService(Service):
    """The routes' Service on the ingress: no engine here, the jobs run on engine replicas."""

    def __init__(self, config: ServerConfig, engine_config: Any, engine: Any | None, *,
                 dispatch: Callable[[str], Awaitable[Any]],
                 is_replica_death: Callable[[BaseException], bool] = lambda e: False,
                 prompt_checker: Callable[[], Awaitable[tuple[Any, int] | None]] | None = None) -> None:
        if not config.database_url:
            raise ValueError("a scaled-out server needs the shared job database (database_url)")
        super().__init__(config, engine_config, engine)
        self._dispatch_fn = dispatch
        self._is_death = is_replica_death
        self._fetch_checker = prompt_checker
        self._checker: tuple[Any, int] | None = None
        self._checker_retry_at = 0.0

    def check_prompts(self, prompt: str, negative_prompt: str) -> None:
        """Refuse (422) a prompt over CLAP's token limit at submission, as on one machine, with the
        tokenizer and limit fetched once from a replica. Called from a worker thread."""
        from foleyserve.models.encoders import PromptTooLongError, check_token_counts
        from foleyserve.server.errors import ApiError

        checker = self._checker or self._load_checker()
        if checker is None:
            return  # the replica's prepare stage still refuses it (the job fails instead)
        try:
            check_token_counts(checker[0], checker[1], prompt, negative_prompt)
        except PromptTooLongError as e:
            raise ApiError(422, "prompt_too_long", str(e)) from None

    def _load_checker(self) -> tuple[Any, int] | None:
        batcher = self.batcher
        if self._fetch_checker is None or not isinstance(batcher, Dispatcher) or time.monotonic() < self._checker_retry_at:
            return None
        try:
            self._checker = batcher.run(self._fetch_checker(), timeout_s=PROMPT_CHECK_S)
        except Exception as e:
            # Every replica busy or none yet: do not hold submissions up; ask again in a while.
            self._checker_retry_at = time.monotonic() + 30.0
            log.warning("could not fetch the prompt tokenizer from a replica (%s); prompts are checked when jobs run",
                        type(e).__name__)
        return self._checker

    def _load(self) -> None:
        batcher = Dispatcher(self, self._dispatch_fn, self._is_death)
        batcher.start()
        self.batcher = batcher  # ready follows the replicas' heartbeats (Dispatcher._refresh)

    def engine_info(self) -> dict[str, Any] | None:
        ready = [r for r in self.replicas() or () if r.get("ready")]
        if not ready or not self.ready.is_set():
            return None
        first = ready[0]
        return {"model": str(first.get("model")), "precision": str(first.get("precision")), "device": str(first.get("device"))}

    def replicas(self) -> list[dict[str, Any]] | None:
        batcher = self.batcher
        if not isinstance(batcher, Dispatcher):
            return []
        return [{
            "id": r["id"], "ready": bool(r.get("ready")), "queue_depth": int(r.get("queue_depth") or 0),
            "running": int(r.get("running") or 0), "model": r.get("model"), "precision": r.get("precision"),
            "device": r.get("device"), "node": r.get("node"), "pid": r.get("pid"), "age_s": float(r.get("age_s") or 0),
        } for r in batcher.replicas()]

    def is_demo(self) -> bool:
        return any(str(r.get("model") or "").startswith("demo") for r in self.replicas() or ())


def cluster_queue_limit(config: ServerConfig) -> int:
    """Jobs the whole cluster may hold before submissions get 429: each replica's max_queue, times
    the replicas it may grow to."""
    most = config.autoscale[1] if config.autoscale else config.replicas
    return int(config.max_queue) * max(1, int(most))
