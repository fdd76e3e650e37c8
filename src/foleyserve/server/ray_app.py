"""foleyserve on Ray Serve: one ingress deployment with the usual routes and web page, and one
engine deployment with a replica per GPU, each with its own engine, batcher and cache client.

    ingress (1 replica, no GPU)                       engine (N replicas, num_gpus=1 each)
      create_app(..., IngressService)  -- run(id) -->   ReplicaService: claim in PostgreSQL,
      jobs in PostgreSQL, uploads and                   batch, write results to the shared
      results on the shared data_dir                    data_dir, finish under the lease

Routing: the ingress calls the engine deployment's handle with each job id, and the call stays
open until the job ends, so a replica's ongoing requests are the jobs it holds. Ray Serve's
router sends each call to the less loaded of two sampled replicas (power of two choices on
ongoing requests) and holds calls back while every replica is at ``max_ongoing_requests``;
that is the queue-depth routing. Autoscaling (``autoscale: [min, max]``) uses the same count.

The batch key (same latent length, same token counts) holds because batching happens inside
each replica's own batcher, exactly as on one machine; ``@serve.batch`` is not used.

Imports Ray at module level: only ``foleyserve serve --ray`` and the cluster tests import this.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve

from foleyserve.config import EngineConfig
from foleyserve.server.settings import ServerConfig

log = logging.getLogger("foleyserve.server")

APP_NAME = "foleyserve"
ENGINE = "engine"
INGRESS = "ingress"


def _setup_logging(config: ServerConfig) -> None:
    logging.getLogger("foleyserve").setLevel(config.log_level.upper())


def is_replica_death(exc: BaseException) -> bool:
    """Whether a failed handle call means the replica that ran it is gone."""
    import ray.exceptions

    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError))


class EngineReplica:
    """One engine replica: loads the model in its constructor (so Ray Serve routes to it only
    when it can run jobs), then runs the jobs the ingress sends it."""

    def __init__(self, server_config: ServerConfig, engine_config: EngineConfig) -> None:
        from foleyserve.pipeline.pipeline import Engine
        from foleyserve.server.cluster_engine import ReplicaService

        _setup_logging(server_config)
        context = serve.get_replica_context()
        replica_id = f"{context.deployment}-{context.replica_id.unique_id}"
        engine = Engine.from_config(engine_config)
        self.service = ReplicaService(server_config, engine_config, engine, replica_id=replica_id)
        self.service.start()
        if self.service.load_error is not None:
            raise RuntimeError(f"the serving runtime failed to start: {self.service.load_error}")
        log.info("engine replica %s ready (pid %d)", replica_id, os.getpid())

    async def run(self, job_id: str) -> dict[str, Any]:
        """Claim the job and run it here; returns when it has ended (so the router counts it)."""
        status, done = await asyncio.to_thread(self.service.take, job_id)
        if done is not None:
            await self.service.wait(done)
        return {"status": status, "replica": self.service.replica_id}

    def prompt_checker(self) -> tuple[Any, int] | None:
        """CLAP's tokenizer and token limit (a few kB pickled): the ingress fetches them once and
        refuses over-long prompts at submission (422), as on one machine."""
        from foleyserve.models.encoders import clap_token_limit

        comps = getattr(self.service.engine, "components", None)
        tokenizer, clap = getattr(comps, "tokenizer", None), getattr(comps, "clap", None)
        if tokenizer is None or clap is None:
            return None
        return tokenizer, clap_token_limit(clap.config.max_position_embeddings, clap.config.pad_token_id)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising has the replica replaced."""
        problem = self.service.healthy()
        if problem is not None:
            raise RuntimeError(problem)

    def describe(self) -> dict[str, Any]:
        return {"id": self.service.replica_id, **self.service.describe()}

    def __del__(self) -> None:
        # Ray Serve calls this after draining the replica (scale-down, redeploy): hand back what is left.
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


@serve.ingress()
class IngressReplica:
    """The HTTP routes and web page, with jobs sent to the engine deployment."""

    def __init__(self, server_config: ServerConfig, engine_config: EngineConfig, engine: Any) -> None:
        _setup_logging(server_config)
        self._server_config = server_config
        self._engine_config = engine_config
        self._engine = engine

    def __serve_build_asgi_app__(self) -> Any:
        from foleyserve.server.app import create_app
        from foleyserve.server.cluster_ingress import IngressService, cluster_queue_limit

        handle = self._engine

        async def dispatch(job_id: str) -> Any:
            return await handle.run.remote(job_id)

        async def prompt_checker() -> tuple[Any, int] | None:
            return await handle.prompt_checker.remote()

        def service(config: ServerConfig, engine_config: EngineConfig | None, engine: Any) -> IngressService:
            return IngressService(config, engine_config, engine, dispatch=dispatch, is_replica_death=is_replica_death,
                                  prompt_checker=prompt_checker)

        config = replace(self._server_config, max_queue=cluster_queue_limit(self._server_config))
        return create_app(config, self._engine_config, service_factory=service)


def build_app(server_config: ServerConfig, engine_config: EngineConfig) -> Any:
    """The Ray Serve application (ingress bound to the engine deployment) for these options."""
    if not server_config.database_url:
        raise ValueError("scaling out needs database_url (PostgreSQL): every replica must see every job")
    server_config = replace(server_config, data_dir=Path(server_config.data_dir).resolve(),
                            cache_dir=Path(server_config.cache_dir).resolve() if server_config.cache_dir else None)
    engine_options: dict[str, Any] = dict(
        name=ENGINE,
        # Jobs a replica holds at once (queued in its batcher plus the running batch); more wait
        # in the router until a replica has room.
        max_ongoing_requests=int(server_config.max_queue + server_config.max_batch_size),
        ray_actor_options={"num_cpus": float(server_config.replica_cpus), "num_gpus": float(server_config.replica_gpus)},
        health_check_period_s=5.0,
        health_check_timeout_s=60.0,
        # Ray Serve first drains a stopping replica (waits for the jobs it holds, i.e. its open
        # calls), then calls __del__, which hands the rest back; past this it kills the replica.
        graceful_shutdown_timeout_s=float(server_config.shutdown_grace_s) + 10.0,
    )
    if server_config.autoscale:
        low, high = server_config.autoscale
        engine_options["autoscaling_config"] = {
            "min_replicas": int(low), "max_replicas": int(high), "initial_replicas": max(1, int(low)),
            # About one full batch per replica before another one is started.
            "target_ongoing_requests": float(server_config.max_batch_size),
            # A replica loads a multi-GB model: scale up on a sustained queue, down slowly.
            "upscale_delay_s": 15.0, "downscale_delay_s": 300.0,
        }
    else:
        engine_options["num_replicas"] = int(server_config.replicas)
    engine = serve.deployment(**engine_options)(EngineReplica)
    ingress = serve.deployment(name=INGRESS, num_replicas=1, max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": 0})(IngressReplica)
    return ingress.bind(server_config, engine_config, engine.bind(server_config, engine_config))


def start(server_config: ServerConfig, engine_config: EngineConfig, *, init: dict[str, Any] | None = None,
          wait_ready_s: float | None = None) -> str:
    """Join (``ray_address``) or start a local Ray, deploy the application and return its URL.
    ``init`` adds ``ray.init`` options (tests: CPUs, object store size)."""
    import ray

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        options.update(init or {})
        ray.init(address=server_config.ray_address or "local", **options)
    _warn_if_short(server_config, ray.cluster_resources())
    serve.start(http_options={"host": server_config.host, "port": int(server_config.port)})
    serve.run(build_app(server_config, engine_config), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if server_config.host in ("0.0.0.0", "::") else server_config.host
    url = f"http://{host}:{server_config.port}"
    if wait_ready_s:
        wait_ready(url, wait_ready_s)
    return url


def _warn_if_short(config: ServerConfig, resources: dict[str, float]) -> None:
    """Ray Serve waits, silently, for resources it may never get (a GPU on a CPU-only machine):
    say so up front. Only a warning: an autoscaling Ray cluster may still add the nodes."""
    need = config.autoscale[0] if config.autoscale else config.replicas
    for name, per in (("GPU", float(config.replica_gpus)), ("CPU", float(config.replica_cpus))):
        have = float(resources.get(name, 0.0))
        if per > 0 and have < per * need:
            log.warning("the engine replicas need %g %s(s) in all (%d x %g); the Ray cluster has %g now, so some "
                        "replicas wait until it grows", per * need, name, need, per, have)


def wait_ready(url: str, timeout_s: float, replicas: int = 1) -> dict[str, Any]:
    """Poll /readyz until at least ``replicas`` engine replicas report ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200 and sum(1 for x in last.get("replicas") or () if x["ready"]) >= replicas:
                return last
        except Exception as e:  # not listening yet
            last = repr(e)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready with {replicas} replica(s) within {timeout_s:g} s; last answer: {last}")


def stop() -> None:
    """Remove the application (its replicas hand their jobs back) and stop Serve."""
    try:
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()


def app_builder(args: dict[str, Any]) -> Any:
    """The application for ``serve run`` and KubeRay's RayService:
    ``import_path: foleyserve.server.ray_app:app_builder``, with ``args`` the ``foleyserve serve``
    options by name (``profile: cluster``, ``model_dir: /models/...``, ``autoscale: "1,4"``,
    ``demo: true``); the database URL and API key come from FOLEYSERVE_DATABASE_URL and
    FOLEYSERVE_API_KEY as for the command. Host and port are the Serve config's http_options."""
    from foleyserve.cli import build_parser
    from foleyserve.commands.serve import configs_from_args

    argv = ["serve", "--ray"]
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True or str(value).lower() == "true":
            argv.append(flag)
        elif value is not None and value is not False and str(value).lower() != "false":
            argv += [flag, str(value)]
    engine_config, server_config = configs_from_args(build_parser().parse_args(argv))
    return build_app(server_config, engine_config)
