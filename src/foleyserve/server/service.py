"""The job lifecycle behind the routes: load the engine, submit and cancel jobs, record their
state as the batcher reports it, keep their results, recover after a restart, enforce retention."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

from foleyserve import media
from foleyserve.config import EngineConfig
from foleyserve.pipeline.requests import DEFAULT_LOUDNESS, GenerationRequest, RequestError
from foleyserve.server.jobs import ACTIVE_STATUSES, FINAL_STATUSES, JobRecord, open_store
from foleyserve.server.prometheus import LiveSources, ServerMetrics
from foleyserve.server.results import candidate_list, rank_of, sample_list, seeds_of, write_files
from foleyserve.server.settings import ServerConfig
from foleyserve.server.storage import (
    CHECK_INTERVAL_S, ResultVerifier, StorageHealth, describe_storage_error, file_digest, is_storage_error,
)

log = logging.getLogger("foleyserve.server")

PROGRESS_WRITE_INTERVAL_S = 0.2
# How often a job's final state is re-written while the disk refuses it.
UNSAVED_RETRY_S = 1.0
# Batcher error codes whose message is meant for the user (the others are internal).
USER_ERROR_CODES = ("invalid_video", "video_too_short", "invalid_request", "invalid_parameter")

class Service:
    """The state behind the routes: store, metrics, and (once loaded) engine, cache and batcher."""

    def __init__(self, config: ServerConfig, engine_config: EngineConfig | None, engine: Any | None) -> None:
        if engine is None and engine_config is None:
            raise ValueError("create_app needs an engine_config (to load a model) or a prebuilt engine")
        self.config = config
        self.engine_config = engine_config
        self.engine = engine
        # SQLite in data_dir, or PostgreSQL when the config has a database_url (a cluster).
        self.store: Any = open_store(config)
        self.storage = StorageHealth(config.data_dir, int(config.min_free_mb * 2**20))
        self.storage.refresh()
        self.verifier = ResultVerifier()
        self.cache: Any | None = None
        self.batcher: Any | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        # Set while compiled steps are being warmed up: {"done", "total", "current"}.
        self.warmup: dict[str, Any] | None = None
        self.metrics = ServerMetrics(
            LiveSources(
                queue_depth=lambda: self.batcher.queue_depth() if self.batcher is not None else None,
                cache_stats=lambda: self.cache.stats() if self.cache is not None else None,
                ready=self.ready.is_set,
                engine_info=self.engine_info,
            )
        )
        self._lock = threading.Lock()
        self._progress_written: dict[str, float] = {}
        self._user_cancelled: set[str] = set()
        # Final states the store refused to write (full or read-only disk), retried until it
        # takes them; reads see them meanwhile, so clients never see a finished job as running.
        self._unsaved: dict[str, dict[str, Any]] = {}
        self._stopping = False
        self._stop_janitor = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.engine is not None:
            self._load()  # nothing slow left to do: be ready before the first request
        else:
            t = threading.Thread(target=self._load, name="foleyserve-loader", daemon=True)
            t.start()
            self._threads.append(t)
        janitor = threading.Thread(target=self._janitor, name="foleyserve-retention", daemon=True)
        janitor.start()
        self._threads.append(janitor)

    def stop(self) -> None:
        """Shut down: queued jobs stay queued on disk (the next start re-runs them); the running
        batch gets ``shutdown_grace_s`` to finish, then is cut short and also re-runs next time."""
        with self._lock:
            self._stopping = True
        self._stop_janitor.set()
        self.ready.clear()
        batcher, cache = self.batcher, self.cache
        if batcher is not None:
            try:
                batcher.stop(timeout=self.config.shutdown_grace_s)
                leftovers = [rec.id for rec in self.store.active() if batcher.cancel(rec.id)]
                if leftovers:
                    log.info("shutdown: %d running job(s) cut short; they re-run on the next start", len(leftovers))
                    batcher.stop(timeout=10.0)
            except Exception:
                log.exception("stopping the batcher failed")
        if cache is not None:
            try:
                cache.close()
            except Exception:
                log.exception("closing the cache failed")
        for t in self._threads:
            if t.name == "foleyserve-retention":
                t.join(timeout=10.0)
        if self.retry_unsaved():
            log.warning("shutdown: %d job(s) ended but the disk refused their final state; they re-run on the next start",
                        len(self._unsaved))
        self.store.close()

    def _load(self) -> None:
        try:
            from foleyserve.runtime.batcher import Batcher, BatcherConfig
            from foleyserve.runtime.cache import FoleyCache

            engine = self.engine
            if engine is None:
                from foleyserve.pipeline.pipeline import Engine

                log.info("loading the model (%s)", self.engine_config)
                engine = Engine.from_config(self.engine_config)  # type: ignore[arg-type]
            c = self.config
            cache = FoleyCache(
                None if c.cache == "off" else c.cache,
                directory=c.resolved_cache_dir,
                max_bytes=int(c.cache_max_gb * 2**30),
                namespace=f"{engine.components.name}|{engine.precision}",
                memory_bytes=int(c.cache_memory_mb * 2**20),
            )
            self._warm_up(engine)
            if c.preload_scorers:
                from foleyserve.pipeline.bestof import engine_scorers

                engine_scorers(engine)
            batcher = Batcher(
                engine,
                BatcherConfig(
                    max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                    max_queue=c.max_queue, length_bucket=c.length_bucket,
                ),
                cache,
                on_update=self._on_update,
                on_batch=self._on_batch,
            )
            batcher.start()
        except Exception as e:
            log.exception("the model or the serving runtime failed to load; /readyz stays 503")
            self.load_error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self.engine, self.cache, self.batcher = engine, cache, batcher
        if stopping:  # the app shut down while the model was loading
            batcher.stop(timeout=1.0)
            cache.close()
            return
        try:
            self._recover()
        except Exception:
            log.exception("re-queueing the jobs of the previous run failed; they stay as recorded")
        self.ready.set()
        log.info("ready: model %s, precision %s, device %s", engine.components.name, engine.precision, engine.device)

    def _warm_up(self, engine: Any) -> None:
        """Compile the profile's step buckets before the server reports ready (compile on only)."""
        c = self.config
        if not getattr(engine, "compiled", False) or not c.warmup_seconds:
            return

        def progress(done: int, total: int, what: str) -> None:
            self.warmup = {"done": done, "total": total, "current": what}
            log.info("warm-up %d/%d: %s", done, total, what)

        records = engine.warm_up(c.warmup_seconds, batch_sizes=c.warmup_batch_sizes, progress=progress)
        self.warmup = {"done": len(records), "total": len(records), "current": "done", "buckets": records}

    def engine_info(self) -> dict[str, Any] | None:
        e = self.engine if self.ready.is_set() else None
        if e is None:
            return None
        return {"model": str(e.components.name), "precision": str(e.precision), "device": str(e.device)}

    def replicas(self) -> list[dict[str, Any]] | None:
        """The engine replicas behind this API with their state (a cluster), or None (one process)."""
        return None

    def is_demo(self) -> bool:
        """Whether the jobs run on the demo model (the web page warns that its audio is noise)."""
        return str(getattr(getattr(self.engine, "components", None), "name", "")).startswith("demo")

    # -- restart recovery and retention -----------------------------------------------------------

    def _recover(self) -> None:
        """Re-queue jobs a previous process left queued or running, if their upload survived."""
        from foleyserve.runtime.batcher import QueueFull

        requeued = failed = 0
        live: list[str] = []
        for rec in self.store.active():
            upload = self.store.upload_path(rec.id)
            if rec.params.get("text_only") or (rec.upload and upload.is_file()):
                if not self.store.update_if_active(rec.id, status="queued", started=None, progress_step=0, progress_total=0):
                    continue  # cancelled while the model loaded
                try:
                    self.batcher.submit(self._request_for(rec, upload), priority=rec.priority, job_id=rec.id,  # type: ignore[union-attr]
                                        seeds=seeds_of(rec.params), rank=rank_of(rec.params))
                    requeued += 1
                    live.append(upload.name)
                    continue
                except (QueueFull, RequestError) as e:
                    why = f"it could not be re-queued after a restart ({e}); submit it again"
            else:
                why = f"the server stopped while this job was {rec.status} and its upload is gone; submit it again"
            self._fail_now(rec.id, "interrupted", why)
            failed += 1
        for orphan in self.store.orphan_uploads(keep=live):
            unlink(orphan)
        if requeued or failed:
            log.info("restart: %d interrupted job(s) re-queued, %d marked failed", requeued, failed)

    def _fail_now(self, job_id: str, code: str, message: str) -> None:
        if self._write_final(
            job_id, dict(status="failed", finished=time.time(), error_code=code, error_message=message, upload=None)
        ) is not False:
            self.metrics.requests.labels(status="failed").inc()
        unlink(self.store.upload_path(job_id))

    def enforce_retention(self, now: float | None = None) -> list[str]:
        c = self.config
        expired = self.store.enforce_retention(
            max_age_s=c.retention_hours * 3600 if c.retention_hours is not None else None,
            max_bytes=int(c.retention_max_gb * 2**30) if c.retention_max_gb is not None else None,
            now=now,
        )
        if expired:
            log.info("retention: deleted the results of %d job(s)", len(expired))
        return expired

    def _janitor(self) -> None:
        next_retention = 0.0
        while True:
            if time.monotonic() >= next_retention:
                try:
                    self.enforce_retention()
                except Exception as e:
                    if is_storage_error(e):
                        self.storage.write_failed(e)
                    log.exception("result retention failed; will retry")
                next_retention = time.monotonic() + self.config.retention_interval_s
            try:
                self.storage.refresh(self.store.probe_write)
            except Exception:
                log.exception("checking the data directory failed; will retry")
            self.retry_unsaved()
            if self._stop_janitor.wait(min(CHECK_INTERVAL_S, UNSAVED_RETRY_S, self.config.retention_interval_s)):
                return

    # -- final states the disk refused -------------------------------------------------------------

    def _write_final(self, job_id: str, changes: dict[str, Any]) -> bool | None:
        """Write a job's final state; on a storage fault keep it in memory for the janitor to
        retry. True/False: written (the row changed or not); None: deferred."""
        try:
            changed = self.store.update_if_active(job_id, **changes)
        except Exception as e:
            if not is_storage_error(e):
                raise
            self.storage.write_failed(e)
            with self._lock:
                self._unsaved[job_id] = changes
            log.warning("job %s ended but its state could not be written (%s); retrying every %g s",
                        job_id, describe_storage_error(e), UNSAVED_RETRY_S)
            return None
        self.storage.write_succeeded()
        with self._lock:
            self._unsaved.pop(job_id, None)
        return changed

    def retry_unsaved(self) -> int:
        """Try again to write the final states the store refused; returns how many are left."""
        with self._lock:
            pending = list(self._unsaved.items())
        for job_id, changes in pending:
            try:
                self.store.update_if_active(job_id, **changes)
            except Exception as e:
                if is_storage_error(e):
                    self.storage.write_failed(e)
                    break  # the disk still refuses; the next round tries again
                log.exception("writing the final state of job %s failed; will retry", job_id)
                continue
            self.storage.write_succeeded()
            with self._lock:
                if self._unsaved.get(job_id) is changes:
                    del self._unsaved[job_id]
            unlink(self.store.upload_path(job_id))
            log.info("job %s: final state written after the storage recovered", job_id)
        with self._lock:
            return len(self._unsaved)

    def record(self, job_id: str) -> JobRecord | None:
        """A job's record as clients should see it: the store's row, or the final state the
        store has not accepted yet."""
        rec = self.store.get(job_id)
        if rec is None:
            return None
        with self._lock:
            unsaved = self._unsaved.get(job_id)
        return dataclasses.replace(rec, **unsaved) if unsaved is not None and not rec.is_final else rec

    def recent(self, limit: int, owner: str | None) -> list[JobRecord]:
        rows = self.store.recent(limit, owner)
        with self._lock:
            unsaved = dict(self._unsaved)
        return [dataclasses.replace(r, **unsaved[r.id]) if r.id in unsaved and not r.is_final else r for r in rows]

    # -- batcher callbacks (worker threads) --------------------------------------------------------

    def _on_batch(self, size: int, stages: dict[str, float]) -> None:
        try:
            self.metrics.observe_batch(size, stages)
        except Exception:
            log.exception("recording batch metrics failed")

    def _on_update(self, job: Any) -> None:
        # Never let bookkeeping break the batcher's worker: a failure here is logged and the job
        # stays as last recorded (a restart re-queues it from its upload).
        try:
            self._record(job)
        except Exception:
            log.exception("recording the state of job %s failed", getattr(job, "id", "?"))

    def _record(self, job: Any) -> None:
        status = job.status
        step, total = job_progress(job)
        now = time.time()
        if status == "preparing":
            self._write_progress(job.id, {"status": "preparing"})
            return
        if status == "running":
            with self._lock:
                last = self._progress_written.get(job.id)
                if last is not None and now - last < PROGRESS_WRITE_INTERVAL_S:
                    return
                self._progress_written[job.id] = now
            changes: dict[str, Any] = {"status": "running", "progress_step": step, "progress_total": total}
            if last is None:
                rec = self.store.get(job.id)
                if rec is not None and rec.started is None:
                    changes["started"] = now
                    self.metrics.queue_wait_seconds.observe(max(now - rec.created, 0.0))
            self._write_progress(job.id, changes)
            return
        if status not in FINAL_STATUSES:
            return
        with self._lock:
            self._progress_written.pop(job.id, None)
            user_cancelled = job.id in self._user_cancelled
            self._user_cancelled.discard(job.id)
            if self._stopping and status != "succeeded" and not user_cancelled:
                # Shutting down: keep the job queued with its upload so the next start re-runs it.
                return
        rec = self.store.get(job.id)
        if rec is None or rec.is_final:
            return
        # A result-cache hit never reports "running": it starts and ends at once.
        started = rec.started if rec.started is not None or status != "succeeded" else now
        changes = {
            "status": status, "started": started, "finished": now, "cache_hit": bool(getattr(job, "cache_hit", False)),
            "batch_size": getattr(job, "batch_size", None), "progress_step": step, "progress_total": total,
            "upload": None,
        }
        if status == "succeeded":
            try:
                changes.update(self._keep_result(job, rec))
            except Exception as e:
                log.exception("saving the result of job %s failed", job.id)
                self.store.remove_results(job.id)
                if is_storage_error(e):
                    self.storage.write_failed(e)
                    changes.update(status="failed", error_code="storage_unavailable",
                                   error_message=f"the result could not be saved: {describe_storage_error(e)}; submit the job again later")
                else:
                    changes.update(status="failed", error_code="result_write_failed",
                                   error_message=f"the result could not be saved on the server ({type(e).__name__}); submit the job again")
        else:
            self.store.remove_results(job.id)
            if status == "failed":
                code, message = self._describe_failure(job)
                changes.update(error_code=code, error_message=message)
            else:
                changes.update(error_code="cancelled", error_message="the job was cancelled")
        written = self._write_final(job.id, changes)
        if written is not False:
            self.metrics.observe_finished(
                changes["status"], timings=changes.get("timings", {}),
                seconds=now - rec.created, audio_seconds=changes.get("audio_seconds"),
            )
        elif changes["status"] == "succeeded":
            # The row ended meanwhile (cancelled; in a cluster, handed to another replica): the
            # files just written belong to no outcome.
            self.store.remove_results(job.id)
        self._release_upload(job.id, written)

    def _release_upload(self, job_id: str, written: bool | None) -> None:
        """Delete a job's upload once its final state is recorded (True) or the row had already
        ended (False). While the final state is unsaved (None) the upload stays: if the process
        stops before the disk takes the state, the next start re-runs the job from it."""
        if written is not None:
            unlink(self.store.upload_path(job_id))

    def _write_progress(self, job_id: str, changes: dict[str, Any]) -> None:
        # Progress is advisory: a disk that refuses it must not fail the job (its final state is
        # what _write_final keeps safe).
        try:
            self.store.update_if_active(job_id, **changes)
        except Exception as e:
            if not is_storage_error(e):
                raise
            self.storage.write_failed(e)

    def _write_results(self, job: Any, rec: JobRecord) -> dict[str, str]:
        """Put the batcher's output where downloads read it; returns ``JobRecord.files``."""
        return write_files(self.store, job, rec)

    def _keep_result(self, job: Any, rec: JobRecord) -> dict[str, Any]:
        result = job.result
        if result is None:
            raise RuntimeError("the batcher reported success without a result")
        files = self._write_results(job, rec)
        warnings = list(dict.fromkeys(str(w) for r in (job.results or [result]) for w in (r.warnings or [])))
        checksums = {n: file_digest(self.store.result_path(n)) for n in files.values()}
        return {
            "files": files,
            "checksums": checksums,
            "result_bytes": sum(size for size, _ in checksums.values()),
            "timings": {k: float(v) for k, v in (result.timings or {}).items()},
            "audio_seconds": float(result.audio_seconds),
            "video_seconds": float(result.video_seconds),
            "warnings": [self._scrub(w, rec.id) for w in warnings],
            "ranking": getattr(job, "ranking", None) or {},
        }

    def _describe_failure(self, job: Any) -> tuple[str, str]:
        err = job.error
        code = job.error_code
        if err is not None and is_storage_error(err):
            self.storage.write_failed(err)
            return "storage_unavailable", f"the result could not be written: {describe_storage_error(err)}; submit the job again later"
        if code in USER_ERROR_CODES or isinstance(err, (RequestError, media.MediaError)):
            default = "invalid_video" if isinstance(err, media.MediaError) else "invalid_request"
            return code or default, self._scrub(str(err), job.id)
        # The batcher logged the traceback; the client gets no internals (paths, library errors).
        log.warning("job %s failed with an internal error: %s", job.id, err)
        return (
            "internal_error" if code in (None, "internal") else code,
            f"the generation failed with an internal error; the server log has the details (job {job.id})",
        )

    def _scrub(self, text: str, job_id: str) -> str:
        """Server paths out of messages shown to clients."""
        upload = self.store.upload_path(job_id)
        for p in {str(upload.resolve()), str(upload)}:
            text = text.replace(p, "the uploaded video")
        for p in {str(self.store.results_dir.resolve()), str(self.store.results_dir)}:
            text = text.replace(p + "/", "").replace(p, "the results folder")
        return text

    # -- requests --------------------------------------------------------------------------------

    def _request_for(self, rec: JobRecord, upload: Path) -> GenerationRequest:
        p = rec.params
        return GenerationRequest(
            video=None if p.get("text_only") else upload, prompt=p["prompt"], negative_prompt=p["negative_prompt"], steps=int(p["steps"]),
            guidance=float(p["guidance"]), seed=int(p["seed"]),
            output=self.store.result_path(f"{rec.id}.{p['output']}"),
            keep_original_audio_gain=p.get("keep_original_audio"),
            # Jobs stored before these fields existed get the defaults.
            loudness=None if p.get("loudness", DEFAULT_LOUDNESS) == "off" else float(p.get("loudness", DEFAULT_LOUDNESS)),
            bit_depth=int(p["bit_depth"]) if p.get("bit_depth") else None,
            start=float(p.get("start") or 0.0),
            duration=float(p["duration"]) if p.get("duration") is not None else None,
        )

    def body(self, rec: JobRecord, root: str = "") -> dict[str, Any]:
        step, total, status = rec.progress_step, rec.progress_total, rec.status
        batcher = self.batcher
        if status in ACTIVE_STATUSES and batcher is not None:
            # Progress is written to disk at most every 0.2 s; the live job is fresher.
            live = batcher.get(rec.id)
            if live is not None and live.status in ACTIVE_STATUSES:
                status = live.status
                step, total = job_progress(live)
        # A result file removed behind our back reads as expired, without links to a 410.
        ok = rec.status == "succeeded" and rec.expired is None and all(
            self.store.result_path(n).is_file() for n in rec.files.values()
        )
        base = f"{root}/v1/generations/{rec.id}"
        p = rec.params
        return {
            "id": rec.id, "status": status, "priority": rec.priority,
            "progress": {"step": step, "total": total},
            "cache_hit": rec.cache_hit, "timings": rec.timings,
            "error": {"code": rec.error_code or "failed", "message": rec.error_message or ""} if rec.status == "failed" else None,
            "created": rec.created, "started": rec.started, "finished": rec.finished,
            "audio_url": f"{base}/audio" if ok and "audio" in rec.files else None,
            "video_url": f"{base}/video" if ok and "video" in rec.files else None,
            "expired": rec.status == "succeeded" and not ok,
            "prompt": p["prompt"], "negative_prompt": p["negative_prompt"], "steps": p["steps"],
            "guidance": p["guidance"], "seed": p["seed"], "output": p["output"],
            "keep_original_audio": p.get("keep_original_audio"),
            "duration": rec.audio_seconds, "video_duration": rec.video_seconds,
            "batch_size": rec.batch_size, "warnings": rec.warnings,
            "text_only": bool(p.get("text_only")), "num_samples": int(p.get("num_samples") or 1),
            "results": sample_list(rec, base, ok),
            "best_of": p.get("best_of"), "rank": p.get("rank"),
            "ranked_by": (rec.ranking or {}).get("ranked_by"), "candidates": candidate_list(rec, base, ok),
            # Which engine replica ran the job, and how many claims it took (clustered servers).
            "replica": rec.replica, "attempt": rec.attempt,
        }

    def check_prompts(self, prompt: str, negative_prompt: str) -> None:
        """Refuse (422) a prompt over CLAP's token limit when it arrives, not after it queued."""
        from foleyserve.models.encoders import PromptTooLongError, check_prompt_lengths
        from foleyserve.server.errors import ApiError

        comps = getattr(self.engine, "components", None)
        if comps is None or getattr(comps, "tokenizer", None) is None or getattr(comps, "clap", None) is None:
            return  # the prepare stage still refuses it
        try:
            check_prompt_lengths(comps.tokenizer, comps.clap, prompt, negative_prompt)
        except PromptTooLongError as e:
            raise ApiError(422, "prompt_too_long", str(e)) from None

    def delete_results(self, rec: JobRecord) -> JobRecord:
        """DELETE on a finished job: remove its result files now (the record stays, expired)."""
        self.store.remove_results(rec.id)
        if rec.status == "succeeded" and rec.expired is None:
            now = time.time()
            try:
                self.store.update(rec.id, expired=now)
            except Exception as e:
                if not is_storage_error(e):
                    raise
                self.storage.write_failed(e)
            rec = dataclasses.replace(rec, expired=now)
        return rec

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._user_cancelled.add(job_id)
        batcher = self.batcher
        if batcher is not None and batcher.cancel(job_id):
            return  # queued: cancelled now (on_update records it); running: leaves at the next step
        with self._lock:
            self._user_cancelled.discard(job_id)
        if batcher is not None and batcher.get(job_id) is not None:
            return  # it ended just now; on_update records how
        # Unknown to the batcher (its row awaits re-queueing while the model loads): end it here.
        if self._write_final(job_id, dict(
            status="cancelled", finished=time.time(), error_code="cancelled",
            error_message="the job was cancelled", upload=None,
        )) is not False:
            self.metrics.requests.labels(status="cancelled").inc()
            unlink(self.store.upload_path(job_id))


def job_progress(job: Any) -> tuple[int, int]:
    try:
        step, total = job.progress
        return int(step), int(total)
    except (TypeError, ValueError):
        return 0, 0


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not delete %s", path)


