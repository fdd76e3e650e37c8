"""A thin ONNX Runtime wrapper for exported stages: load one from an export folder, check it, run it.

Imports numpy, onnxruntime and the manifest module only: an exported folder must be usable in a
process that has neither torch nor the model code (the point of exporting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from foleyserve.export.manifest import Manifest, ManifestError, StageEntry, TensorSpec, read_manifest, sha256_file


class StageRuntime:
    """One exported stage as an ONNX Runtime session, with its manifest entry."""

    def __init__(self, entry: StageEntry, session: ort.InferenceSession) -> None:
        self.entry = entry
        self.session = session
        self._check_session_matches()

    @classmethod
    def load(
        cls,
        export_dir: str | Path,
        stage: str,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        verify_hash: bool = True,
        manifest: Manifest | None = None,
    ) -> "StageRuntime":
        """Open ``stage`` from ``export_dir``; ``verify_hash`` checks the graph file against the manifest."""
        manifest = manifest if manifest is not None else read_manifest(export_dir)
        if stage not in manifest.stages:
            raise ManifestError(f"stage {stage!r} is not in {export_dir}; it has {sorted(manifest.stages)}")
        entry = manifest.stages[stage]
        path = Path(export_dir) / entry.file
        if not path.is_file():
            raise ManifestError(f"{path} (stage {stage!r}) is listed in the manifest but missing")
        data = entry.extra.get("data_file")
        if data and (not (Path(export_dir) / data).is_file() or (Path(export_dir) / data).stat().st_size != entry.extra.get("data_bytes")):
            raise ManifestError(f"{Path(export_dir) / data} (the weights of stage {stage!r}) is missing or not the size "
                                f"the manifest records: re-export the folder")
        if verify_hash and sha256_file(path) != entry.graph_sha256:
            # A graph re-exported without its manifest would otherwise run with stale parity claims.
            raise ManifestError(f"{path} does not match the sha256 in the manifest: re-export the folder")
        opts = ort.SessionOptions()
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        return cls(entry, session)

    def _check_session_matches(self) -> None:
        got = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        want = ([t.name for t in self.entry.inputs], [t.name for t in self.entry.outputs])
        if got != want:
            raise ManifestError(f"graph for {self.entry.stage!r} has inputs/outputs {got}, manifest says {want}")

    @staticmethod
    def _check_input(spec: TensorSpec, value: np.ndarray) -> None:
        if value.dtype != np.dtype(spec.dtype):
            raise TypeError(f"input {spec.name!r}: dtype {value.dtype}, the graph takes {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise ValueError(f"input {spec.name!r}: shape {value.shape}, the graph takes {spec.shape}")
        for axis, (dim, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and dim != want:
                raise ValueError(f"input {spec.name!r}: axis {axis} is {dim}, the graph fixes it at {want}")

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the stage on named numpy inputs; returns outputs by name.

        Inputs are checked against the manifest first, so a wrong dtype or a fixed axis of the
        wrong size fails with the input's name rather than an opaque ORT shape error.
        """
        specs = {t.name: t for t in self.entry.inputs}
        if set(inputs) != set(specs):
            raise ValueError(f"stage {self.entry.stage!r} takes inputs {sorted(specs)}, got {sorted(inputs)}")
        feed = {}
        for name, value in inputs.items():
            arr = np.asarray(value)
            self._check_input(specs[name], arr)
            feed[name] = arr
        values = self.session.run(None, feed)
        return {spec.name: v for spec, v in zip(self.entry.outputs, values)}


def load_stage(export_dir: str | Path, stage: str, **kwargs) -> StageRuntime:
    """Shorthand for :meth:`StageRuntime.load`."""
    return StageRuntime.load(export_dir, stage, **kwargs)


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64 (the parity measure of the manifest and the tests)."""
    out64, ref64 = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"shapes differ: {out64.shape} vs {ref64.shape}")
    denom = float(np.linalg.norm(ref64))
    return float(np.linalg.norm(out64 - ref64)) / (denom if denom > 0 else 1.0)


__all__ = ["StageRuntime", "load_stage", "rel_l2", "ManifestError"]
