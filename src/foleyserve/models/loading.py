"""Checkpoint reading and writing: ``.pth``/``.pt``/``.bin`` and ``.safetensors``.

The official weights ship as pickled ``.pth`` files (the DiT alone is 10.3 GB). Three rules shape
this module:

* Never unpickle arbitrary code: ``torch.load`` always runs with ``weights_only=True`` unless the
  caller explicitly passes ``trust_pickle=True``.
* Never hold two full copies of the weights in host memory: files are memory-mapped and tensors
  are moved to their final dtype/device one at a time.
* Never load silently wrong weights: every load is checked key by key and shape by shape
  (the official loaders use ``strict=False`` and only log problems).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionSummary",
    "LoadReport",
    "UnsafeCheckpointError",
    "compare_state_dict",
    "convert_to_safetensors",
    "load_file_into",
    "load_into",
    "peak_rss_bytes",
    "read_checkpoint",
    "read_state_dict",
    "save_safetensors",
]

PathLike = str | os.PathLike[str]
KeyFilter = Callable[[str], bool]

_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
_ZIP_MAGIC = b"PK\x03\x04"

# safetensors dtype codes (the format's own names); anything else cannot be stored.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


class CheckpointError(RuntimeError):
    """A file that cannot be read as a checkpoint (wrong format, corrupt, unsupported layout)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that the weights-only loader refuses; loading it would mean running its code."""


class CheckpointMismatchError(CheckpointError):
    """The state dict does not fit the module; ``report`` holds the details."""

    def __init__(self, report: "LoadReport") -> None:
        super().__init__(report.describe())
        self.report = report


@dataclass
class LoadReport:
    """Outcome of comparing a state dict with a module (and of loading it, when it was loaded)."""

    module: str
    source: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # (key, shape in the checkpoint, shape in the module)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    # Every parameter/buffer that is (or would stay) on the meta device, i.e. has no data: the
    # missing and mis-shaped ones of a meta-built module, plus non-persistent buffers.
    left_on_meta: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.left_on_meta)

    def describe(self, limit: int = 5) -> str:
        where = self.module + (f" from {self.source}" if self.source else "")
        if self.ok:
            return f"{where}: all {self.loaded} tensors matched"

        def listing(items: list[str]) -> str:
            shown = ", ".join(items[:limit])
            return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")

        counts, parts = [], []
        if self.missing:
            counts.append(f"{len(self.missing)} missing")
            parts.append(f"missing from the checkpoint: {listing(self.missing)}")
        if self.unexpected:
            counts.append(f"{len(self.unexpected)} unexpected")
            parts.append(f"not in the module: {listing(self.unexpected)}")
        if self.mismatched:
            counts.append(f"{len(self.mismatched)} mis-shaped")
            shapes = [f"{k} checkpoint {list(a)} vs module {list(b)}" for k, a, b in self.mismatched]
            parts.append(f"mis-shaped: {listing(shapes)}")
        listed = set(self.missing) | {k for k, _, _ in self.mismatched}
        unlisted = [k for k in self.left_on_meta if k not in listed]
        if unlisted:
            counts.append(f"{len(unlisted)} without data")
            parts.append(
                "left on the meta device (not part of the state dict, e.g. non-persistent buffers; "
                f"create them outside the meta context): {listing(unlisted)}"
            )
        return f"checkpoint does not fit {where}: {', '.join(counts)}. " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# reading


def _checkpoint_format(path: Path) -> Literal["safetensors", "torch"]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return "torch"
    # safetensors: little-endian u64 header size, then the JSON header
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pth, .pt or .bin content)"
    )


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, expected a checkpoint file")
    return p


def _unpickler_complaint(err: Exception) -> tuple[bool, str]:
    """(does the file reference Python objects beyond tensors/containers?, short reason)."""
    text = str(err)
    m = re.search(r"Unsupported (?:global|class):? *(?:GLOBAL )?(\S+)", text)
    if m:
        name = m.group(1).rstrip(".,")
        return True, f"it references the Python object {name}, which is not a tensor or plain container"
    m = re.search(r"WeightsUnpickler error: *\n*\s*([^\n]+)", text)
    if m:
        return False, m.group(1).strip().rstrip(".")
    return False, text.splitlines()[0] if text else type(err).__name__


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    # torch.save writes a zip archive (torch >= 1.6) or a protocol-2 pickle stream (older).
    if not is_zip and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            # Emitted for any non-torch pickle just before it is rejected; the rejection says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # mmap only works for the zip format; legacy pickles are read into memory.
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as err:
        unsafe, reason = _unpickler_complaint(err)
        if unsafe and not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refused by the safe (weights-only) loader because {reason}; unpickling it "
                "would run code from the file. If you trust its source, convert it once with "
                "`foleyserve convert --trust-pickle` (trust_pickle=True in Python) and use the "
                "safetensors file"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as err:
        # On corrupt bytes the (legacy or weights-only) unpickler fails with whatever exception
        # the garbage happens to trigger (KeyError, IndexError, EOFError, ...).
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail[:200]})") from None


def _unwrap_torch_object(obj: Any, path: Path) -> tuple[Mapping[str, Any], dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    # The official DAC file is {"state_dict": ..., "metadata": {"kwargs": ...}} (audiotools layout).
    if isinstance(obj.get("state_dict"), Mapping):
        meta = obj.get("metadata")
        return obj["state_dict"], dict(meta) if isinstance(meta, Mapping) else {}
    return obj, {}


def _validated(sd: Mapping[str, Any], path: Path, key_filter: KeyFilter | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; only plain state "
                "dicts and the {'state_dict', 'metadata'} layout are supported"
            )
        if key_filter is None or key_filter(key):
            out[key] = value
    return out


def _read_safetensors(path: Path, key_filter: KeyFilter | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open maps the file; get_tensor hands out views of the mapping, so a tensor only
        # costs memory once its pages are touched and unselected tensors never are.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys() if key_filter is None or key_filter(k)}
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    if "config" in meta:
        try:
            meta["config"] = json.loads(meta["config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: metadata 'config' is not valid JSON ({err})") from None
    return sd, meta


def read_checkpoint(
    path: PathLike, *, key_filter: KeyFilter | None = None, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file as ``(state_dict, metadata)``.

    Tensors stay on CPU, memory-mapped where the format allows. ``metadata`` is the ``metadata``
    dict of a DAC-style ``.pth`` or the header metadata of a ``.safetensors`` file, whose ``config``
    entry (a JSON string on disk) is decoded. A DAC ``.pth``'s ``metadata["kwargs"]`` is also made
    available as ``metadata["config"]`` so that callers read the constructor config the same way
    from both formats.
    """
    p = _check_file(path)
    if _checkpoint_format(p) == "safetensors":
        return _read_safetensors(p, key_filter)
    sd, meta = _unwrap_torch_object(_torch_load(p, trust_pickle), p)
    if isinstance(meta.get("kwargs"), Mapping) and "config" not in meta:
        meta["config"] = dict(meta["kwargs"])
    return _validated(sd, p, key_filter), meta


def read_state_dict(
    path: PathLike, *, key_filter: KeyFilter | None = None, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read only the tensors of a checkpoint (see :func:`read_checkpoint`).

    ``key_filter`` keeps the keys for which it returns True; with safetensors the others are
    never read, with ``.pth`` they are mapped but never paged in.
    """
    return read_checkpoint(path, key_filter=key_filter, trust_pickle=trust_pickle)[0]


# --------------------------------------------------------------------------------------------
# loading into modules


def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


def compare_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | None = None
) -> LoadReport:
    """Key and shape comparison only; nothing is loaded."""
    expected = module.state_dict(keep_vars=True)
    report = LoadReport(module=type(module).__name__, source=source)
    report.missing = [k for k in expected if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in expected]
    for key, target in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(state_dict[key].shape), tuple(target.shape)))
    filled = {k for k in expected if k in state_dict} - {k for k, _, _ in report.mismatched}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if _is_meta(t) and name not in filled:
            report.left_on_meta.append(name)
    report.loaded = len(filled)
    return report


def _target_dtype(
    src: torch.Tensor, current: torch.Tensor, dtype: torch.dtype | Literal["module"] | None
) -> torch.dtype:
    if dtype is None:
        return src.dtype
    if dtype == "module":
        return current.dtype
    # Integer and bool tensors (indices, counters) must never be cast to a float dtype.
    return dtype if src.is_floating_point() else src.dtype


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtype: torch.dtype | Literal["module"] | None = None,
    device: torch.device | str | None = None,
    source: str | None = None,
) -> LoadReport:
    """Put ``state_dict`` into ``module`` (which may live on the meta device) and report the fit.

    Every tensor is converted on its own straight to its final dtype/device and then *assigned*
    (not copied into an existing tensor), so a meta-built module needs no memory for a throwaway
    init and host memory never holds a second full copy. A CPU tensor that already has the right
    dtype is used as is: a memory-mapped checkpoint then backs the parameter directly.

    ``dtype``: ``None`` keeps each tensor's stored dtype; a ``torch.dtype`` casts floating-point
    tensors only; ``"module"`` gives every tensor the dtype the module declares for it (use this
    when some parameters are meant to differ, e.g. fp32 norms in a bf16 model). ``device``: ``None``
    keeps the module's device, CPU for tensors that are on meta.

    With ``strict`` a mismatch raises :class:`CheckpointMismatchError` before anything is loaded.
    Otherwise the matching tensors are loaded and the report lists the rest. Weights tied under two
    names are assigned separately (equal values, no longer the same tensor).
    """
    report = compare_state_dict(module, state_dict, source=source)
    if strict and not report.ok:
        raise CheckpointMismatchError(report)
    expected = module.state_dict(keep_vars=True)
    bad_shape = {k for k, _, _ in report.mismatched}
    want_device = torch.device(device) if device is not None else None
    converted: dict[str, torch.Tensor] = {}
    for key, current in expected.items():
        if key not in state_dict or key in bad_shape:
            continue
        src = state_dict[key]
        dev = want_device or (torch.device("cpu") if _is_meta(current) else current.device)
        converted[key] = src.detach().to(device=dev, dtype=_target_dtype(src, current, dtype)).contiguous()
    module.load_state_dict(converted, strict=False, assign=True)
    return report


def load_file_into(
    module: nn.Module,
    path: PathLike,
    *,
    strict: bool = True,
    dtype: torch.dtype | Literal["module"] | None = None,
    device: torch.device | str | None = None,
    key_filter: KeyFilter | None = None,
    trust_pickle: bool = False,
) -> tuple[LoadReport, dict[str, Any]]:
    """:func:`read_checkpoint` then :func:`load_into`; returns the report and the file metadata."""
    sd, meta = read_checkpoint(path, key_filter=key_filter, trust_pickle=trust_pickle)
    report = load_into(module, sd, strict=strict, dtype=dtype, device=device, source=str(path))
    return report, meta


# --------------------------------------------------------------------------------------------
# writing


def save_safetensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Write a ``.safetensors`` file one tensor at a time; returns the file size in bytes.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object, i.e. a full
    second copy of the weights in memory (10 GB for the XXL DiT). Here the header is computed from
    shapes alone and each tensor is cast, made contiguous, written and dropped before the next.
    ``dtype`` casts floating-point tensors. The file appears atomically (temporary name, then
    rename), so an interrupted run never leaves a truncated checkpoint behind.
    """
    if sys.byteorder != "little":
        raise CheckpointError("safetensors stores little-endian data; this machine is big-endian")
    plan: list[tuple[str, torch.Tensor, torch.dtype, int]] = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if target not in _ST_DTYPES:
            raise CheckpointError(f"{name!r}: dtype {target} cannot be stored in safetensors")
        plan.append((name, t, target, t.numel() * target.itemsize))
    # Largest element size first keeps every tensor aligned to its element size (the header is
    # padded to 8 bytes), which lets readers map tensors without copying.
    plan.sort(key=lambda item: (-item[2].itemsize, item[0]))

    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t, target, nbytes in plan:
        header[name] = {"dtype": _ST_DTYPES[target], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, t, target, nbytes in plan:
                if nbytes == 0:
                    continue
                data = t.detach().to(device="cpu", dtype=target).contiguous()
                f.write(data.reshape(-1).view(torch.uint8).numpy().data)
                del data
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + offset


@dataclass
class ConversionSummary:
    tensors: int
    bytes_written: int
    dtypes: dict[str, int]
    has_config: bool


def convert_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> ConversionSummary:
    """Rewrite a checkpoint (official ``.pth`` or safetensors) as a contiguous safetensors file.

    A DAC-style file's ``metadata.kwargs`` goes into the header metadata as JSON under ``config``,
    the layout :func:`read_checkpoint` and the conformance fixtures use.
    """
    sd, meta = read_checkpoint(src, trust_pickle=trust_pickle)
    header_meta = {"format": "pt"}
    if "config" in meta:
        try:
            header_meta["config"] = json.dumps(meta["config"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{src}: the checkpoint's config cannot be stored as JSON ({err})") from None
    size = save_safetensors(dst, sd, metadata=header_meta, dtype=dtype)
    counts: dict[str, int] = {}
    for t in sd.values():
        name = str(dtype if dtype is not None and t.is_floating_point() else t.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    return ConversionSummary(tensors=len(sd), bytes_written=size, dtypes=counts, has_config="config" in header_meta)


# --------------------------------------------------------------------------------------------
# measurement


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (for load benchmarks)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
