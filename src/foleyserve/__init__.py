"""foleyserve: a faithful, cheaper engine and service for HunyuanVideo-Foley.

    from foleyserve import Engine, GenerationRequest
    engine = Engine.from_pretrained("models/HunyuanVideo-Foley", model="xxl", precision="bf16")
    result = engine.generate(GenerationRequest(video="clip.mp4", prompt="footsteps on gravel", output="out.mp4"))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "foleyserve.pipeline.pipeline",
    "GenerationRequest": "foleyserve.pipeline.requests",
    "GenerationResult": "foleyserve.pipeline.requests",
    "RequestError": "foleyserve.pipeline.requests",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Lazy, so that `foleyserve --version` or `convert` do not pay for importing the whole engine.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'foleyserve' has no attribute {name!r}")
