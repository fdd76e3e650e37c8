"""Cache keys and entries: what a cached visual, text or result value is keyed by, and its bytes
(a small JSON header and safetensors, never pickle). See :mod:`foleyserve.runtime.cache`."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from foleyserve import media
from foleyserve.pipeline.features import TextFeatures, VisualFeatures

LEVELS = ("visual", "text", "result")
# Entry layout: MAGIC, u32 little-endian header length, JSON header, safetensors payload.
_MAGIC = b"FSCACHE1"
_MAX_HEADER = 1 << 20
# Key version: bump when what a key covers changes, so old entries are simply never found.
_KEY_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# keys


def normalise_prompt(text: str) -> str:
    """Strip and collapse runs of whitespace to one space; case is kept (CLAP is case-sensitive)."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    return " ".join(text.split())


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def frames_key(decoded: media.DecodedVideo) -> str:
    """SHA-256 over the uint8 frames the two visual encoders consume (8 fps and 25 fps), shapes included.

    Both rates are hashed because the 25 fps frames carry motion the 8 fps ones do not see."""
    h = hashlib.sha256(f"foleyserve-frames-v{_KEY_VERSION}".encode())
    for fps in (media.SIGLIP_FPS, media.SYNC_FPS):
        frames = decoded.frames.get(fps) if isinstance(getattr(decoded, "frames", None), dict) else None
        if frames is None:
            raise ValueError(f"decoded video has no {fps} fps frames; decode it with engine.decode() before keying it")
        arr = np.asarray(frames)
        # The header makes shape part of the key: the same bytes split into other frames differ.
        h.update(json.dumps({"fps": fps, "dtype": str(arr.dtype), "shape": list(arr.shape)}).encode())
        if arr.flags.c_contiguous:
            h.update(memoryview(arr).cast("B"))
        else:
            for frame in arr:  # one frame at a time: no full-clip copy
                h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


def text_key(prompt: str, negative_prompt: str) -> str:
    return _digest({"v": _KEY_VERSION, "prompt": normalise_prompt(prompt), "negative": normalise_prompt(negative_prompt)})


def result_key(
    frames: str,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    model: str,
    precision: str,
) -> str:
    return _digest(
        {
            "v": _KEY_VERSION,
            "frames": str(frames),
            "prompt": normalise_prompt(prompt),
            "negative": normalise_prompt(negative_prompt),
            "seed": int(seed),
            "steps": int(steps),
            # float() so 4, 4.0 and numpy.float64(4.0) name the same result.
            "guidance": float(guidance),
            "model": str(model),
            "precision": str(precision),
        }
    )


# ---------------------------------------------------------------------------------------------
# values


@dataclass
class CachedResult:
    waveform: torch.Tensor  # [1, T] float32
    sample_rate: int
    meta: dict = field(default_factory=dict)  # json-able: seed, timings, model...


class CorruptEntry(ValueError):
    """A stored entry that cannot be read back as the value it claims to be."""


def _host(t: torch.Tensor) -> torch.Tensor:
    # A private contiguous CPU copy: safetensors refuses views that share storage (text and
    # uncond come out of one batched CLAP call), and the cache must not alias the caller's tensor.
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def encode_entry(level: str, value: Any) -> bytes:
    """Serialise a cache value of ``level`` to bytes (safetensors + JSON header)."""
    if level == "visual":
        if not isinstance(value, VisualFeatures):
            raise TypeError(f"put_visual takes VisualFeatures, got {type(value).__name__}")
        tensors = {"siglip": value.siglip, "sync": value.sync}
        meta: dict[str, Any] = {"frames_25fps": int(value.frames_25fps)}
    elif level == "text":
        if not isinstance(value, TextFeatures):
            raise TypeError(f"put_text takes TextFeatures, got {type(value).__name__}")
        tensors = {"text": value.text, "uncond": value.uncond}
        meta = {}
    elif level == "result":
        if not isinstance(value, CachedResult):
            raise TypeError(f"put_result takes CachedResult, got {type(value).__name__}")
        tensors = {"waveform": value.waveform}
        meta = {"sample_rate": int(value.sample_rate), "meta": value.meta}
    else:
        raise ValueError(f"unknown cache level {level!r}; one of {LEVELS}")
    header = json.dumps({"kind": level, "meta": meta}, allow_nan=False).encode("utf-8")
    payload = st_save({name: _host(t) for name, t in tensors.items()})
    return _MAGIC + struct.pack("<I", len(header)) + header + payload


def _tensor(tensors: dict[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    t = tensors.get(name)
    if t is None or t.ndim != ndim:
        raise CorruptEntry(f"tensor {name!r} missing or not {ndim}-D")
    return t


def decode_entry(level: str, blob: bytes) -> Any:
    """Inverse of :func:`encode_entry`; raises :class:`CorruptEntry` on anything unexpected."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptEntry(f"entry is {type(blob).__name__}, not bytes")
    blob = bytes(blob)
    if len(blob) < len(_MAGIC) + 4 or not blob.startswith(_MAGIC):
        raise CorruptEntry("not a foleyserve cache entry (bad magic)")
    (n,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    if n > _MAX_HEADER or start + n > len(blob):
        raise CorruptEntry("header length out of range")
    try:
        header = json.loads(blob[start : start + n].decode("utf-8"))
        tensors = st_load(blob[start + n :])
    except Exception as e:  # json, unicode and safetensors errors all mean the same thing here
        raise CorruptEntry(f"unreadable entry: {e}") from e
    if not isinstance(header, dict) or header.get("kind") != level or not isinstance(header.get("meta"), dict):
        raise CorruptEntry(f"entry is not a {level} entry")
    meta = header["meta"]
    try:
        if level == "visual":
            return VisualFeatures(
                siglip=_tensor(tensors, "siglip", 3), sync=_tensor(tensors, "sync", 3), frames_25fps=int(meta["frames_25fps"])
            )
        if level == "text":
            return TextFeatures(text=_tensor(tensors, "text", 3), uncond=_tensor(tensors, "uncond", 3))
        inner = meta["meta"]
        if not isinstance(inner, dict):
            raise CorruptEntry("result meta is not an object")
        return CachedResult(waveform=_tensor(tensors, "waveform", 2), sample_rate=int(meta["sample_rate"]), meta=inner)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptEntry):
            raise
        raise CorruptEntry(f"bad {level} metadata: {e}") from e


