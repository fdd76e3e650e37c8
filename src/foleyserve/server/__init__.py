"""The HTTP service (FastAPI): ``create_app(ServerConfig(...), engine_config)``, profiles in ``settings``.

    from foleyserve.server import ServerConfig, create_app, load_profile
    engine_config, server_config = load_profile("realtime")
    app = create_app(server_config, engine_config)   # any ASGI server; `foleyserve serve` uses uvicorn
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "create_app": "foleyserve.server.app",
    "ServerConfig": "foleyserve.server.settings",
    "load_profile": "foleyserve.server.settings",
    "JobStore": "foleyserve.server.jobs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that reading a profile (the CLI's argument checks) does not import FastAPI.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'foleyserve.server' has no attribute {name!r}")
