"""The export manifest: what each exported ONNX graph takes and returns, and where it came from.

``manifest.json`` in an export folder records, per stage, the graph file and its sha256, every
input and output (name, dtype, shape with named dynamic axes), the opset, the exporter, the
sha256 of the source checkpoint files (or of the state dict, for the demo's seeded weights) and
the parity measured against torch at export time.

Importable without torch: the runtime wrapper reads manifests in processes that have no model
code. Hashing a state dict takes tensors, but only duck-typed ones (``.cpu().numpy()``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

MANIFEST_NAME = "manifest.json"
# Bumped on any change a reader of an older manifest would misread.
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, malformed, of another format version, or disagrees with its files."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a ``str`` in ``shape`` names a dynamic axis."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list[int | str]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class StageEntry:
    """One exported stage (e.g. ``dac_decoder``)."""

    stage: str
    file: str  # relative to the export folder
    graph_sha256: str
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str  # what the weights were: a checkpoint path or "demo (seed N)"
    source_hashes: dict[str, str]  # file name (or "state_dict") -> sha256
    # Measured at export: {"<shape>": rel_l2, ...} at lengths other than the export one.
    parity: dict[str, float] = field(default_factory=dict)
    export_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """Every stage of one export folder."""

    stages: dict[str, StageEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    producer: dict[str, str] = field(default_factory=dict)  # foleyserve / torch / onnx versions

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Parse a manifest dict; raises :class:`ManifestError` on anything unexpected."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest is not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {version!r}; this foleyserve reads {FORMAT_VERSION}")
        try:
            stages = {}
            for name, raw in data["stages"].items():
                entry = dict(raw)
                entry["inputs"] = [TensorSpec(**t) for t in entry["inputs"]]
                entry["outputs"] = [TensorSpec(**t) for t in entry["outputs"]]
                stages[name] = StageEntry(**entry)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        return cls(stages=stages, format_version=version, producer=dict(data.get("producer", {})))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state_dict: Mapping[str, Any]) -> str:
    """Hex sha256 over a state dict's names, dtypes, shapes and bytes, in sorted key order.

    For weights that exist only in memory (the demo's seeded ones); independent of dict order
    and of tensor strides, so the same weights always hash the same.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        arr = state_dict[key].detach().cpu().contiguous().numpy()
        h.update(f"{key}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def write_manifest(export_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``export_dir`` atomically (a reader never sees half of it)."""
    path = Path(export_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def read_manifest(export_dir: str | Path) -> Manifest:
    """Read and validate ``export_dir/manifest.json``."""
    path = Path(export_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST_NAME} in {export_dir}: is this an export folder?") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)
