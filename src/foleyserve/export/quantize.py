"""INT8 graphs for the edge tier: ONNX Runtime dynamic quantisation of an export folder's graphs.

Dynamic quantisation stores MatMul/Gemm weights as int8 (per output channel) and quantises
activations per call from their observed range, so it needs no calibration set and holds for any
clip; static quantisation would fix activation ranges from a calibration set, which the DiT's
timestep-dependent activations make fragile. Only MatMul/Gemm are quantised: they carry >95 % of
the transformers' FLOPs, and ONNX Runtime's ConvInteger path is slower than its fp32 convolutions
on x86, so the DAC decoder (all convolutions) stays fp32 unless asked for.

Graphs are replaced in place and their manifest entries say ``extra["precision"] = "int8"``; the
fidelity of the result is measured end to end (``bench/export_runtimes.py``, tests).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from foleyserve.export.manifest import Manifest, StageEntry, read_manifest, sha256_file, write_manifest
from foleyserve.export.stages import GROUPS

# Where INT8 measured both faster and close on this project's CPU (BENCHMARKS.md, "Exported
# runtimes"): SigLIP2 2.3x at 2.6 % rel-L2, CLAP 1.6x at 0.3 %. Synchformer was 2.4x faster but
# 14 % off, and the DiT step 1.1x faster than ONNX Runtime fp32 at 1.7 % per step, an error the
# sampler compounds; both remain available through ``stages``.
INT8_DEFAULT_STAGES = ("siglip", "clap")
_OPS = ["MatMul", "Gemm"]


def quantize_stages(export_dir: str | Path, stages: Sequence[str] = INT8_DEFAULT_STAGES, *, ops: Sequence[str] = _OPS) -> Manifest:
    """Quantise the graphs of ``stages`` in ``export_dir`` to int8 weights (dynamic activations).

    Stages already int8 are left alone. Returns the updated manifest (written atomically after
    each graph, so an interrupted run leaves every graph either fp32 or int8, never half).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    manifest = read_manifest(export_dir)
    folder = Path(export_dir)
    for group in stages:
        if group not in GROUPS:
            raise ValueError(f"unknown stage {group!r}: choose from {', '.join(GROUPS)}")
        for graph in GROUPS[group]:
            entry = manifest.stages.get(graph)
            if entry is None:
                raise ValueError(f"{export_dir} has no {graph} graph to quantise: export stage {group} first")
            if entry.extra.get("precision") == "int8":
                continue
            src = folder / entry.file
            tmp = folder / f".{entry.file}.int8.tmp"
            external = bool(entry.extra.get("external_data"))
            t0 = time.perf_counter()
            plain = _without_value_info(src, external)
            fp32_bytes = _graph_bytes(src)
            try:
                quantize_dynamic(
                    str(plain), str(tmp), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(ops),
                    use_external_data_format=external, extra_options={"MatMulConstBOnly": True},
                )
                layout = _save_in_place(tmp, src)
            finally:
                for leftover in folder.glob(f".{src.stem}*"):
                    leftover.unlink(missing_ok=True)
            extra = {**{k: v for k, v in entry.extra.items() if k not in ("data_file", "data_bytes")}, **layout, "precision": "int8", "quantization": "dynamic, int8 weights per channel, "
                     f"ops {'/'.join(ops)}", "fp32_graph_sha256": entry.graph_sha256, "fp32_bytes": fp32_bytes,
                     "int8_bytes": _graph_bytes(src), "quantize_seconds": round(time.perf_counter() - t0, 3)}
            manifest.stages[graph] = StageEntry(**{**entry.__dict__, "graph_sha256": sha256_file(src), "extra": extra})
            write_manifest(export_dir, manifest)
    return manifest


def _without_value_info(path: Path, external: bool) -> Path:
    """A copy of the graph without its intermediate shape annotations.

    The quantiser re-runs ONNX shape inference, which disagrees with some of the dynamo
    exporter's annotations on the DiT's fused projections (a symbolic dimension inferred as
    the example's value); without them inference starts from the inputs and succeeds.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    del model.graph.value_info[:]
    out = path.with_name(f".{path.stem}.plain.onnx")
    onnx.save(model, str(out), save_as_external_data=external, location=out.name + ".data" if external else None)
    return out


def _save_in_place(quantized: Path, dst: Path) -> dict:
    """Write the quantised graph over ``dst``: one file when it fits protobuf's 2 GB (int8 weights
    are a quarter of fp32, so most do), else with its weights in ``<dst>.data``. Returns the
    manifest facts of the layout."""
    import onnx

    model = onnx.load(str(quantized), load_external_data=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    external = size > (1 << 31) - (1 << 27)
    data = dst.with_name(dst.name + ".data")
    staged = dst.with_name(f".{dst.stem}.staged.onnx")
    if external:
        onnx.save(model, str(staged), save_as_external_data=True, location=data.name + ".staged")
        os.replace(staged.with_name(data.name + ".staged"), data)
        # The graph names its weights file; rewrite the reference to the final name.
        model = onnx.load(str(staged), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save(model, str(staged))
    else:
        onnx.save(model, str(staged))
        data.unlink(missing_ok=True)
    os.replace(staged, dst)
    return {"external_data": external, **({"data_file": data.name, "data_bytes": data.stat().st_size} if external else {})}


def _graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


__all__ = ["INT8_DEFAULT_STAGES", "quantize_stages"]
