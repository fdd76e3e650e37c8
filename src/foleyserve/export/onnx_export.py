"""Export the pipeline's stages to ONNX, measure their parity against torch, record a manifest.

The shared export call and the DAC decoder (latent length and batch dynamic) are here; the
encoders are in :mod:`foleyserve.export.encoders_onnx`, the DiT step in
:mod:`foleyserve.export.dit_onnx`, and whole-model exports in :mod:`foleyserve.export.exporter`. Each exporter takes a built torch
module, writes ``<stage>.onnx`` into the export folder, runs the graph under ONNX Runtime (CPU,
fp32) at lengths *other* than the export one, and returns the :class:`StageEntry` for the
manifest with the measured rel-L2.

Exporter: torch's default (dynamo, ``torch.export``) is used. Both it and the TorchScript
exporter reproduce the DAC decoder at ~1e-6 rel-L2 at unseen lengths; dynamo is chosen because
its dynamic axes are symbolic (proved over the range, not traced at one shape then renamed),
and the TorchScript exporter is deprecated since torch 2.9. It costs ~8 s against ~0.4 s for
the toy DAC; ``exporter="torchscript"`` remains for models torch.export cannot capture.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from foleyserve.export.manifest import Manifest, StageEntry, TensorSpec, sha256_file
from foleyserve.export.ort_runtime import StageRuntime, rel_l2

DEFAULT_OPSET = 18
DAC_STAGE = "dac_decoder"
# The lengths parity is measured at must differ from the export one, or a graph that baked the
# example shape into a Reshape would pass; odd and larger lengths catch off-by-one crops too.
DAC_EXPORT_LATENT_LEN = 16
DAC_PARITY_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (3, 41))  # (batch, latent length)
_MAX_LATENT_LEN = 1 << 20  # far past any clip: 2**20 latents at 50 Hz is ~6 hours


class _DacDecodeGraph(nn.Module):
    """z [B, latent_dim, L] -> audio [B, 1, L * hop]: DAC.decode as a module's forward."""

    def __init__(self, dac: nn.Module) -> None:
        super().__init__()
        self.dac = dac

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.dac.decode(z)


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic: Mapping[str, Mapping[int, tuple[str, int, int]]],
    opset: int,
    exporter: str,
    external_data: bool = False,
) -> None:
    """One torch.onnx.export call for either exporter; ``dynamic`` is name -> axis -> (axis name, min, max).

    ``external_data`` writes the weights to ``<file>.data`` beside the graph (needed past protobuf's
    2 GB limit); otherwise one self-contained file, which the manifest hashes whole.
    """
    if exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}

        def dim(name: str, lo: int, hi: int) -> Any:
            # One Dim object per axis name, so axes that share a name are constrained equal.
            return dims.setdefault(name, torch.export.Dim(name, min=lo, max=hi))

        flat = [{ax: dim(*spec) for ax, spec in dynamic.get(n, {}).items()} for n in input_names]
        kwargs = {"dynamic_shapes": _by_signature(module, flat), "dynamo": True}
    elif exporter == "torchscript":
        kwargs: dict[str, Any]
        axes = {n: {ax: spec[0] for ax, spec in d.items()} for n, d in dynamic.items()}
        kwargs = {"dynamic_axes": axes, "dynamo": False}
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    if exporter == "dynamo":
        kwargs["external_data"] = external_data
    # The exporter narrates its passes on stdout and warns about axis names it merged (expected:
    # axes share names on purpose); stdout belongs to the caller (`foleyserve export --json`).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            opset_version=opset, verbose=False, **kwargs,
        )


def _by_signature(module: nn.Module, flat: list[Any]) -> tuple[Any, ...]:
    """Per-input dynamic shapes grouped as torch.export sees ``forward``'s arguments: inputs past
    the named parameters belong to a ``*tensors`` parameter, which takes them as one tuple."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return (*flat[: len(named)], tuple(flat[len(named):]))
    return tuple(flat)


def _graph_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the written graph declares them (what ORT will enforce)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return TensorSpec(value.name, str(np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))), shape)

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def stage_entry(
    stage: str, path: Path, *, opset: int, exporter: str, source: str, source_hashes: Mapping[str, str],
    export_seconds: float, extra: dict[str, Any],
) -> StageEntry:
    """The manifest entry of a graph just written to ``path`` (its specs read back from the file)."""
    inputs, outputs = _graph_specs(path)
    return StageEntry(
        stage=stage, file=path.name, graph_sha256=sha256_file(path), opset=opset, exporter=exporter,
        inputs=inputs, outputs=outputs, source=source, source_hashes=dict(source_hashes),
        export_seconds=round(export_seconds, 3), extra=extra,
    )


ParityCase = tuple[str, dict[str, np.ndarray], np.ndarray]  # (label, graph inputs, torch's output)


def with_parity(entry: StageEntry, export_dir: str | Path, cases: Iterable[ParityCase]) -> StageEntry:
    """``entry`` with the rel-L2 of its graph (ORT CPU fp32) against torch on each case recorded."""
    runtime = StageRuntime.load(export_dir, entry.stage, manifest=Manifest(stages={entry.stage: entry}))
    output = entry.outputs[0].name
    parity = {label: rel_l2(runtime.run(**feed)[output], ref) for label, feed, ref in cases}
    return StageEntry(**{**entry.__dict__, "parity": parity})


def export_dac_decoder(
    dac: nn.Module,
    export_dir: str | Path,
    *,
    source: str,
    source_hashes: Mapping[str, str],
    export_latent_len: int = DAC_EXPORT_LATENT_LEN,
    parity_shapes: Iterable[tuple[int, int]] = DAC_PARITY_SHAPES,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
) -> StageEntry:
    """Export ``dac`` 's decoder (batch and latent length dynamic) and measure its ORT parity.

    ``dac`` is a :class:`foleyserve.models.vae.DAC` in fp32; it is not modified (the weight
    norm is folded on a copy, which is both what an inference graph wants and one op per conv).
    The parity is ORT CPU fp32 vs ``dac.decode`` in torch fp32 at ``parity_shapes``, none of
    which may be the export shape.
    """
    out_dir = Path(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{DAC_STAGE}.onnx"
    parity_shapes = [tuple(s) for s in parity_shapes]
    # Batch 2 at export: torch.export specialises a size-1 axis to the constant 1.
    export_shape = (2, export_latent_len)
    if export_shape in parity_shapes or any(L == export_latent_len for _, L in parity_shapes):
        raise ValueError("parity must be measured at latent lengths other than the export one")
    graph = _DacDecodeGraph(copy.deepcopy(dac).float().cpu().fold_weight_norm()).eval()
    gen = torch.Generator().manual_seed(seed)
    example = (torch.randn(*export_shape[:1], dac.latent_dim, export_shape[1], generator=gen),)
    t0 = time.perf_counter()
    _export(
        graph, example, path, input_names=["z"], output_names=["audio"], opset=opset, exporter=exporter,
        dynamic={"z": {0: ("batch", 1, 64), 2: ("latent_len", 1, _MAX_LATENT_LEN)}},
    )
    entry = stage_entry(
        DAC_STAGE, path, opset=opset, exporter=exporter, source=source, source_hashes=source_hashes,
        export_seconds=time.perf_counter() - t0,
        extra={"hop_length": int(dac.hop_length), "sample_rate": int(dac.sample_rate), "latent_dim": int(dac.latent_dim),
               "export_shape": [export_shape[0], int(dac.latent_dim), export_shape[1]]},
    )

    def cases():
        for batch, length in parity_shapes:
            z = torch.randn(batch, dac.latent_dim, length, generator=gen)
            with torch.no_grad():
                ref = dac.float().cpu().decode(z).numpy()
            yield f"{batch}x{dac.latent_dim}x{length}", {"z": z.numpy()}, ref

    return with_parity(entry, out_dir, cases())
