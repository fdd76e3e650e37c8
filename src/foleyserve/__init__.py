"""foleyserve: a faithful, cheaper engine and service for Tencent's HunyuanVideo-Foley.

Video + text prompt -> 48 kHz Foley audio (optionally muxed back into the video)::

    from foleyserve import Engine, GenerationRequest
    engine = Engine.from_pretrained("models/HunyuanVideo-Foley", model="xxl", precision="bf16")
    result = engine.generate(GenerationRequest(video="clip.mp4", prompt="footsteps on gravel", output="out.mp4"))

Public API (imported on first use, so ``import foleyserve`` stays cheap):

``Engine``
    Loads a model (:meth:`Engine.from_pretrained`, :meth:`Engine.from_config`,
    :meth:`Engine.demo`) and runs requests (:meth:`Engine.generate`, :meth:`Engine.generate_batch`).
``EngineConfig``, ``ConfigError``
    Every engine option as one typed, validated object (precision, step cache, compile, offload).
``GenerationRequest``, ``GenerationResult``, ``RequestError``
    What a caller asks for, what it gets back, and the error for a request that cannot run.
``generate``
    One call: load a model folder (or the demo model), generate for one video, return the result.
``__version__``

The HTTP service (``foleyserve serve``) needs the ``serve`` extra: ``pip install 'foleyserve[serve]'``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from foleyserve.config import ConfigError, EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError

_EXPORTS = {
    "Engine": "foleyserve.pipeline.pipeline",
    "EngineConfig": "foleyserve.config",
    "ConfigError": "foleyserve.config",
    "GenerationRequest": "foleyserve.pipeline.requests",
    "GenerationResult": "foleyserve.pipeline.requests",
    "RequestError": "foleyserve.pipeline.requests",
}
__all__ = ["__version__", "generate", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Lazy, so that `foleyserve --version` or `convert` do not pay for importing torch and the
    # whole engine (about 2 s on a small CPU).
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'foleyserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public API (loaded or not yet), not this module's own helper imports.
    return sorted({*__all__, "__doc__", "__file__", "__name__", "__path__"})


def generate(
    video: str | Path | bytes,
    prompt: str = "",
    *,
    model_dir: str | Path | None = None,
    output: str | Path | None = None,
    **options: Any,
) -> "GenerationResult":
    """Load a model and generate Foley for one video: the shortest path from Python.

    ``model_dir`` is the official weights folder; None uses the tiny random-weight demo model
    (its audio is noise). ``options`` are :class:`GenerationRequest` fields (``negative_prompt``,
    ``steps``, ``guidance``, ``seed``, ``keep_original_audio_gain``) or :class:`EngineConfig`
    fields (``model``, ``precision``, ``device``, ``step_cache``, ...). Loading costs far more
    than one request: to run several, build an :class:`Engine` once and call its ``generate``.
    """
    from dataclasses import fields

    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest

    request_keys = {f.name for f in fields(GenerationRequest)} - {"video", "prompt", "output"}
    engine_keys = {f.name for f in fields(EngineConfig)} - {"model_dir", "demo", "extra"}
    unknown = sorted(set(options) - request_keys - engine_keys)
    if unknown:
        raise TypeError(f"generate() got unknown option(s) {', '.join(unknown)}")
    config = EngineConfig(
        model_dir=Path(model_dir) if model_dir is not None else None,
        demo=model_dir is None,
        **{k: v for k, v in options.items() if k in engine_keys},
    )
    if model_dir is None and "precision" not in options:
        from foleyserve.pipeline.demo import demo_precision

        config.precision = demo_precision(config.device)[0]  # the one demo rule the CLI uses too
    request = GenerationRequest(
        video=video, prompt=prompt, output=output, **{k: v for k, v in options.items() if k in request_keys}
    )
    return Engine.from_config(config).generate(request)
