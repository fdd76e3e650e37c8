"""`foleyserve serve`: the HTTP API and web page under uvicorn.

Options come from a deployment profile (``--profile realtime|batch|edge|cloud`` or a YAML path),
then from flags, which win. The API key may also come from the FOLEYSERVE_API_KEY environment
variable (so it stays out of shell history and process listings).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from foleyserve.cli import EXIT_OK, UsageError
from foleyserve.config import MODEL_SIZES, PRECISION_NAMES, ConfigError, EngineConfig

if TYPE_CHECKING:
    from foleyserve.server.settings import ServerConfig

# Flag -> ServerConfig field, for the flags that override a profile one to one.
_SERVER_FLAGS = {
    "host": "host", "port": "port", "data_dir": "data_dir", "cache": "cache", "cache_dir": "cache_dir",
    "max_batch_size": "max_batch_size", "max_wait_ms": "max_wait_ms", "max_queue": "max_queue",
    "max_upload_mb": "max_upload_mb", "log_level": "log_level", "shutdown_grace_s": "shutdown_grace_s",
    "database_url": "database_url", "replicas": "replicas", "ray_address": "ray_address",
    "replica_gpus": "replica_gpus", "lease_seconds": "lease_seconds",
}
DATABASE_URL_ENV = "FOLEYSERVE_DATABASE_URL"
# Options that only mean something with --ray.
_RAY_ONLY = ("replicas", "autoscale", "ray_address", "replica_gpus")
_ENGINE_FLAGS = {
    "model": "model", "precision": "precision", "device": "device", "siglip_dir": "siglip_dir", "clap_dir": "clap_dir",
    "step_cache": "step_cache", "compile": "compile", "offload": "offload", "backend": "backend", "export_dir": "export_dir",
    "encoder_precision": "encoder_precision", "student": "student", "light_decoder": "light_decoder",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from foleyserve.server.settings import API_KEY_ENV, LOG_LEVELS

    p = sub.add_parser(
        "serve",
        help="run the HTTP API and web page",
        description=(
            "Serve the generation API (POST /v1/generations, docs at /docs), the web page (/), "
            "/healthz, /readyz and /metrics. A --profile sets engine and server options; flags override it."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="folder with the official HunyuanVideo-Foley files")
    src.add_argument("--demo", action="store_true", default=None, help="tiny random-weight model (output is noise; no download)")
    p.add_argument("--profile", metavar="NAME|PATH", help="deployment profile: realtime, batch, edge, edge-cpu, cloud, cluster, turbo, auto, or a YAML file")
    p.add_argument("--auto", action="store_true", help="choose model, precision, offload, batch size and step cache for this machine (the auto profile); flags win")
    p.add_argument("--model", choices=MODEL_SIZES, help="which denoiser of the model folder (default xxl)")
    p.add_argument("--precision", help=f"denoiser precision: {', '.join(PRECISION_NAMES)} (default bf16)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--step-cache", type=float, metavar="T", help="denoiser step cache threshold, e.g. 0.05 (default off = exact)")
    p.add_argument("--compile", action="store_true", default=None, help="compile each denoising step as one graph (CUDA graph on GPU); see the profile's warmup_seconds")
    p.add_argument("--offload", choices=("none", "stage", "sequential"), help="where weights live between stages (default none)")
    p.add_argument("--siglip-dir", type=Path, help="local google/siglip2-base-patch16-512 folder (default: search)")
    p.add_argument("--clap-dir", type=Path, help="local laion/larger_clap_general folder (default: search)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"),
                   help="run exported stages on ONNX Runtime or TensorRT engines (needs --export-dir; default torch)")
    p.add_argument("--export-dir", type=Path, help="the folder `foleyserve export` wrote (for --backend)")
    p.add_argument("--backend-stages", metavar="STAGES", help="comma-separated stages the backend runs (default: all exported)")
    p.add_argument("--encoder-precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="SigLIP2, Synchformer and CLAP under autocast of this dtype (default auto: the official handling)")
    p.add_argument("--student", type=Path, metavar="PATH", help="turbo tier: a distilled student denoiser (`foleyserve distill train`)")
    p.add_argument("--light-decoder", type=Path, metavar="PATH", help="turbo tier: a light DAC decoder (`foleyserve distill train --target decoder`)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--data-dir", type=Path, help="jobs database, uploads and results (default ./foleyserve-data)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API (or set {API_KEY_ENV})")
    p.add_argument("--cache", metavar="off|memory|disk|redis://HOST:PORT/DB", help="feature and result cache (default disk)")
    p.add_argument("--cache-dir", type=Path, help="folder of the disk cache (default DATA_DIR/cache)")
    p.add_argument("--max-batch-size", type=int, help="jobs per batched denoising loop")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more jobs")
    p.add_argument("--max-queue", type=int, help="jobs waiting before new ones get 429")
    p.add_argument("--max-upload-mb", type=float, help="largest accepted upload")
    p.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable), e.g. https://studio.example")
    p.add_argument("--shutdown-grace-s", type=float, help="seconds the running batch may finish in on shutdown")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default info)")
    cluster = p.add_argument_group("scale out (docs/scale-out.md)")
    cluster.add_argument("--ray", action="store_true", help="serve on Ray Serve: an ingress plus engine replicas (one per GPU), jobs in PostgreSQL")
    count = cluster.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, metavar="N", help="engine replicas (with --ray; default 1)")
    count.add_argument("--autoscale", metavar="MIN,MAX", help="let Ray Serve scale the engine replicas between MIN and MAX by queue depth")
    cluster.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (auto, or ray://head:10001); default: start a local one")
    cluster.add_argument("--replica-gpus", type=float, metavar="G", help="GPUs per engine replica (1 on a GPU cluster; default 0 = CPU)")
    cluster.add_argument("--database-url", metavar="URL", help=f"jobs in PostgreSQL, postgresql://user@host:5432/db (or set {DATABASE_URL_ENV}; needed by --ray)")
    cluster.add_argument("--lease-seconds", type=float, metavar="S", help="how long a replica holds a job between renewals (default 30)")
    p.set_defaults(run=run)


def configs_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    """Profile, then flags (and the API key variable) -> checked engine and server options."""
    from foleyserve.server.settings import API_KEY_ENV, ServerConfig, check_engine_options, load_profile

    environ = os.environ if environ is None else environ
    try:
        if args.profile:
            engine, server = load_profile(args.profile)
        else:
            engine, server = EngineConfig(), ServerConfig()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "auto", False) or args.profile == "auto":
        engine, server = _auto(engine, server, args)

    if args.model_dir is not None:
        engine = replace(engine, model_dir=args.model_dir, demo=False)
    elif args.demo:
        engine = replace(engine, demo=True, model_dir=None)
    engine = replace(engine, **{field: getattr(args, flag) for flag, field in _ENGINE_FLAGS.items() if getattr(args, flag) is not None})
    if getattr(args, "backend_stages", None) is not None:
        from foleyserve.export.stages import parse_stages

        try:
            engine = replace(engine, backend_stages=parse_stages(args.backend_stages))
        except ValueError as err:
            raise UsageError(f"--backend-stages: {err}") from None
    if engine.backend != "torch" and args.precision is None and not _profile_sets(args.profile, "precision"):
        engine = replace(engine, precision="fp32")  # exported graphs carry their own precision
    elif engine.demo and args.precision is None and not _profile_sets(args.profile, "precision"):
        # One demo precision everywhere (CLI, library, server), so a seed gives the same audio.
        from foleyserve.pipeline.demo import demo_precision

        engine = replace(engine, precision=demo_precision(engine.device)[0])

    changes = {field: getattr(args, flag) for flag, field in _SERVER_FLAGS.items() if getattr(args, flag) is not None}
    if args.cors_origins:
        changes["cors_origins"] = list(args.cors_origins)
    api_key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV) or None
    if api_key is not None:
        changes["api_key"] = api_key
    database_url = getattr(args, "database_url", None) or environ.get(DATABASE_URL_ENV) or None
    if database_url is not None:
        changes["database_url"] = database_url
    if getattr(args, "autoscale", None) is not None:
        changes["autoscale"] = _parse_autoscale(args.autoscale)
    server = replace(server, **changes)
    if not getattr(args, "ray", False):
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --ray")
    elif not server.database_url:
        raise UsageError(f"--ray needs the shared job database: pass --database-url postgresql://user@host:5432/db "
                         f"(or set {DATABASE_URL_ENV}, or use a profile that sets database_url)")

    try:
        check_engine_options(engine)
        server.validate()
    except ConfigError as e:
        raise UsageError(_flag_names(str(e))) from None
    if not engine.demo and engine.model_dir is None:
        raise UsageError("no model given: pass --model-dir DIR (the official weights), --demo, or a profile that sets one")
    if engine.model_dir is not None and not Path(engine.model_dir).is_dir():
        raise UsageError(f"model folder {engine.model_dir} does not exist; pass the folder with the official HunyuanVideo-Foley files")
    if engine.student is not None or engine.light_decoder is not None:
        from foleyserve.distill.turbo import check_turbo_files

        try:
            check_turbo_files(engine.student, engine.light_decoder)  # headers only, before minutes of loading
        except ValueError as err:
            hint = " (the turbo profile's paths are examples: pass --student and --light-decoder)" if args.profile == "turbo" else ""
            raise UsageError(f"{err}{hint}") from None
    if engine.backend != "torch":
        from foleyserve.export.backend import check_export
        from foleyserve.export.stages import BackendError

        try:
            check_export(engine)  # the manifest and its stages, before minutes of loading
        except BackendError as err:
            raise UsageError(str(err)) from None
    return engine, server


def _parse_autoscale(text: str) -> list[int]:
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--autoscale must be MIN,MAX (two whole numbers, e.g. 1,4), got {text!r}") from None
    if not 1 <= low <= high:
        raise UsageError(f"--autoscale must be MIN,MAX with 1 <= MIN <= MAX (no replica: no job is admitted to "
                         f"scale up from), got {text!r}")
    return [low, high]


def _auto(engine: EngineConfig, server: "ServerConfig", args: argparse.Namespace) -> tuple[EngineConfig, "ServerConfig"]:
    """The machine's settings (foleyserve.autoconfig) for the longest clip, printed with their reasons;
    the flags applied after this still win."""
    from foleyserve.autoconfig import available_models, choose, gather_facts

    device = args.device or "auto"
    decision = choose(gather_facts(device), models=available_models(args.model_dir or engine.model_dir), device=device)
    print(f"foleyserve: {decision.describe()}", file=sys.stderr)
    if args.demo:
        print("foleyserve: --auto decides for the real model; the demo model keeps its own settings", file=sys.stderr)
        return engine, server
    return decision.apply(engine), replace(server, max_batch_size=decision.batch_size)


def _profile_sets(profile: str | None, key: str) -> bool:
    """Whether the profile's engine section names ``key`` itself (not just inherits the default)."""
    if not profile:
        return False
    import yaml

    from foleyserve.server.settings import find_profile

    raw = yaml.safe_load(find_profile(profile).read_text(encoding="utf-8")) or {}
    return key in (raw.get("engine") or {})


def _flag_names(message: str) -> str:
    # ServerConfig names its fields (max_batch_size); on the command line they are flags.
    for flag in (*_SERVER_FLAGS, *_ENGINE_FLAGS):
        message = message.replace(f"{flag} must", f"--{flag.replace('_', '-')} must", 1)
    return message


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a taken port is one clear line, not a late uvicorn error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host!r}: {e.strerror}; use an IP address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket says it is TCP; without it every keep-alive request after the first waited ~40 ms
    # for Nagle's algorithm and the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or stop the other server") from None
    # Listen now, not when uvicorn starts: the "listening on" line is printed before uvicorn's
    # startup, and a client that connects in between must wait in the backlog, not be refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --data-dir {data_dir}: {e.strerror}; choose a writable folder") from None
    if not os.access(data_dir, os.W_OK):
        raise UsageError(f"--data-dir {data_dir} is not writable; choose another folder")


def run(args: argparse.Namespace) -> int:
    engine_config, server_config = configs_from_args(args)
    _check_data_dir(Path(server_config.data_dir))
    level = server_config.log_level.upper()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("foleyserve").setLevel(level)  # cli.main quiets it for one-shot commands
    if engine_config.demo:
        from foleyserve.pipeline.demo import demo_precision

        chosen, why = demo_precision(engine_config.device)
        reason = f" ({why})" if chosen == engine_config.precision else ""
        print(f"foleyserve: serving the DEMO model (random weights, {engine_config.precision}{reason}): the audio will be noise",
              file=sys.stderr)
    if not server_config.api_key and not _is_loopback(server_config.host):
        print(f"foleyserve: warning: listening on {server_config.host} without an API key; anyone who can reach "
              f"this port can run jobs (set FOLEYSERVE_API_KEY or --api-key)", file=sys.stderr)
    if getattr(args, "ray", False):
        return _run_ray(engine_config, server_config)
    sock = _listen(server_config.host, server_config.port)

    import uvicorn

    from foleyserve.server.app import create_app

    app = create_app(server_config, engine_config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"foleyserve: listening on http://{shown}:{port} (API docs at /docs); "
          f"the model loads in the background, /readyz says when it is ready", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=server_config.log_level, timeout_graceful_shutdown=max(1, int(server_config.shutdown_grace_s) + 5),
    ))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down cleanly and re-raises Ctrl-C for the caller: a normal stop.
        print("foleyserve: stopped", file=sys.stderr)
    finally:
        sock.close()
    return EXIT_OK


def _run_ray(engine_config: EngineConfig, server_config: "ServerConfig") -> int:
    """Deploy on Ray Serve (a local Ray, or --ray-address) and serve until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from foleyserve.server.settings import redact_url

    try:
        from foleyserve.server import ray_app
    except ImportError as e:
        raise UsageError(f"--ray needs Ray Serve and psycopg ({e}); install them with pip install 'foleyserve[cluster]'") from None
    if server_config.port == 0:
        sock = _listen(server_config.host, 0)  # Ray Serve needs a fixed port: take a free one
        server_config = replace(server_config, port=sock.getsockname()[1])
        sock.close()
    # Fail here, in one line, rather than in every replica: reachable, and the schema migrated.
    shown = redact_url(server_config.database_url or "")
    try:
        import psycopg

        psycopg.connect(server_config.database_url, connect_timeout=5).close()  # the driver's own words on failure
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot use the job database {shown}: {reason}") from None
    try:
        from foleyserve.server.pg_jobs import PgJobStore

        PgJobStore(server_config.database_url, server_config.data_dir, pool_size=1, connect_timeout_s=10).close()
    except Exception as e:
        raise UsageError(f"cannot use the job database {shown}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if server_config.cache in ("memory", "disk") and (server_config.replicas > 1 or server_config.autoscale):
        print("foleyserve: note: each replica keeps its own cache; --cache redis://HOST:6379/0 shares it", file=sys.stderr)
    stop = threading.Event()
    try:
        url = ray_app.start(server_config, engine_config)
        # After ray.init, which installs its own SIGTERM handler (a core dump): stop cleanly instead.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        count = (f"{server_config.autoscale[0]}-{server_config.autoscale[1]} (autoscaling)" if server_config.autoscale
                 else str(server_config.replicas))
        print(f"foleyserve: Ray Serve application on {url} with {count} engine replica(s); the models load in the "
              f"replicas, /readyz lists them", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        try:
            ray_app.stop()
        finally:
            ray.shutdown()
        print("foleyserve: stopped", file=sys.stderr)
    return EXIT_OK
