"""Export the pipeline's stages to ONNX, measure their parity against torch, record a manifest.

The DAC decoder (latent length and batch dynamic) is here; SigLIP2 vision and CLAP text are in
:mod:`foleyserve.export.encoders_onnx`. Each exporter takes a built torch
module, writes ``<stage>.onnx`` into the export folder, runs the graph under ONNX Runtime (CPU,
fp32) at lengths *other* than the export one, and returns the :class:`StageEntry` for the
manifest with the measured rel-L2. Synchformer and the DiT step follow the same shape (issue 11).

Exporter: torch's default (dynamo, ``torch.export``) is used. Both it and the TorchScript
exporter reproduce the DAC decoder at ~1e-6 rel-L2 at unseen lengths; dynamo is chosen because
its dynamic axes are symbolic (proved over the range, not traced at one shape then renamed),
and the TorchScript exporter is deprecated since torch 2.9. It costs ~8 s against ~0.4 s for
the toy DAC; ``exporter="torchscript"`` remains for models torch.export cannot capture.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from foleyserve.export.manifest import (
    Manifest,
    ManifestError,
    StageEntry,
    TensorSpec,
    read_manifest,
    sha256_file,
    sha256_state_dict,
    write_manifest,
)
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


def _producer() -> dict[str, str]:
    import onnx

    from foleyserve import __version__

    return {"foleyserve": __version__, "torch": torch.__version__, "onnx": onnx.__version__}


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
) -> None:
    """One torch.onnx.export call for either exporter; ``dynamic`` is name -> axis -> (axis name, min, max)."""
    if exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}

        def dim(name: str, lo: int, hi: int) -> Any:
            # One Dim object per axis name, so axes that share a name are constrained equal.
            return dims.setdefault(name, torch.export.Dim(name, min=lo, max=hi))

        shapes = {n: {ax: dim(*spec) for ax, spec in dynamic.get(n, {}).items()} for n in input_names}
        kwargs: dict[str, Any] = {"dynamic_shapes": shapes, "dynamo": True}
    elif exporter == "torchscript":
        axes = {n: {ax: spec[0] for ax, spec in d.items()} for n, d in dynamic.items()}
        kwargs = {"dynamic_axes": axes, "dynamo": False}
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    if exporter == "dynamo":
        # One self-contained .onnx file: the manifest hashes a single file per stage.
        kwargs["external_data"] = False
    with torch.no_grad():
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            opset_version=opset, **kwargs,
        )


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
    export_seconds = time.perf_counter() - t0
    inputs, outputs = _graph_specs(path)
    entry = StageEntry(
        stage=DAC_STAGE, file=path.name, graph_sha256=sha256_file(path), opset=opset, exporter=exporter,
        inputs=inputs, outputs=outputs, source=source, source_hashes=dict(source_hashes),
        export_seconds=round(export_seconds, 3),
        extra={"hop_length": int(dac.hop_length), "sample_rate": int(dac.sample_rate), "latent_dim": int(dac.latent_dim),
               "export_shape": [export_shape[0], int(dac.latent_dim), export_shape[1]]},
    )
    runtime = StageRuntime.load(out_dir, DAC_STAGE, manifest=Manifest(stages={DAC_STAGE: entry}))
    parity = {}
    for batch, length in parity_shapes:
        z = torch.randn(batch, dac.latent_dim, length, generator=gen)
        with torch.no_grad():
            ref = dac.float().cpu().decode(z).numpy()
        got = runtime.run(z=z.numpy())["audio"]
        parity[f"{batch}x{dac.latent_dim}x{length}"] = rel_l2(got, ref)
    return StageEntry(**{**entry.__dict__, "parity": parity})


def update_manifest(export_dir: str | Path, entries: Sequence[StageEntry]) -> Manifest:
    """Merge ``entries`` into the folder's manifest (creating it), replacing stages of the same name."""
    try:
        manifest = read_manifest(export_dir)
    except ManifestError:
        manifest = Manifest()
    for entry in entries:
        manifest.stages[entry.stage] = entry
    manifest.producer = _producer()
    write_manifest(export_dir, manifest)
    return manifest


def export_demo(
    export_dir: str | Path, *, stages: Sequence[str] | None = None, seed: int = 0, exporter: str = "dynamo"
) -> Manifest:
    """Export the demo model's stages (all exportable ones by default; seeded random weights, hashed by state dict)."""
    from foleyserve.export.encoders_onnx import CLAP_STAGE, SIGLIP_STAGE, export_clap_text, export_siglip_vision
    from foleyserve.pipeline.demo import demo_components

    exportable = [DAC_STAGE, SIGLIP_STAGE, CLAP_STAGE]
    stages = exportable if stages is None else list(stages)
    unknown = set(stages) - set(exportable)
    if unknown:
        raise ValueError(f"cannot export {sorted(unknown)} yet; exportable: {exportable}")
    components = demo_components(torch.device("cpu"), seed=seed)
    exporters = {DAC_STAGE: (export_dac_decoder, components.dac), SIGLIP_STAGE: (export_siglip_vision, components.siglip),
                 CLAP_STAGE: (export_clap_text, components.clap)}
    entries = []
    for stage in exportable:
        if stage in stages:
            export_stage, module = exporters[stage]
            entries.append(export_stage(
                module, export_dir, source=f"demo (seed {seed})",
                source_hashes={"state_dict": sha256_state_dict(module.state_dict())}, exporter=exporter, seed=seed,
            ))
    return update_manifest(export_dir, entries)
