"""Whole-model exports: every stage of the demo model or of an official weights folder, one manifest.

``foleyserve export`` calls :func:`export_demo` or :func:`export_model_dir`; both write one ONNX
graph per stage (three for the DiT) into the export folder, each measured against torch at
sizes other than the export one, and merge their entries into ``manifest.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from foleyserve.export.manifest import Manifest, ManifestError, StageEntry, read_manifest, write_manifest
from foleyserve.export.stages import GROUPS

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class StageSource:
    """Where one stage's weights came from, as the manifest records it."""

    label: str
    hashes: dict[str, str]
    fingerprints: dict[str, list[int]] = field(default_factory=dict)


def _producer() -> dict[str, str]:
    import onnx

    from foleyserve import __version__

    return {"foleyserve": __version__, "torch": torch.__version__, "onnx": onnx.__version__}


def update_manifest(export_dir: str | Path, entries: Sequence[StageEntry]) -> Manifest:
    """Merge ``entries`` into the folder's manifest (creating it), replacing graphs of the same name."""
    try:
        manifest = read_manifest(export_dir)
    except ManifestError:
        manifest = Manifest()
    for entry in entries:
        manifest.stages[entry.stage] = entry
    manifest.producer = _producer()
    write_manifest(export_dir, manifest)
    return manifest


def export_components(
    components,
    export_dir: str | Path,
    *,
    sources: Mapping[str, StageSource],
    stages: Sequence[str] | None = None,
    exporter: str = "dynamo",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Manifest:
    """Export ``stages`` (every stage when None) of loaded fp32 ``components`` into ``export_dir``.

    The manifest is rewritten after each stage, so an interrupted export keeps what it finished.
    """
    from foleyserve.export.dit_onnx import export_dit_step
    from foleyserve.export.encoders_onnx import export_clap_text, export_siglip_vision, export_synchformer
    from foleyserve.export.onnx_export import export_dac_decoder

    wanted = list(GROUPS) if stages is None else [g for g in GROUPS if g in stages]
    unknown = set(stages or ()) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    runs: dict[str, tuple[Callable, torch.nn.Module]] = {
        "siglip": (export_siglip_vision, components.siglip),
        "synchformer": (export_synchformer, components.synchformer),
        "clap": (export_clap_text, components.clap),
        "dit": (export_dit_step, components.dit),
        "dac": (export_dac_decoder, components.dac),
    }
    Path(export_dir).mkdir(parents=True, exist_ok=True)
    manifest = None
    for i, group in enumerate(wanted):
        if progress:
            progress(group, i, len(wanted))
        run, module = runs[group]
        src = sources[group]
        out = run(module, export_dir, source=src.label, source_hashes=src.hashes, exporter=exporter, seed=seed)
        entries = out if isinstance(out, list) else [out]
        entries = [StageEntry(**{**e.__dict__, "extra": {**e.extra, "source_fingerprints": src.fingerprints, "precision": "fp32"}})
                   for e in entries]
        manifest = update_manifest(export_dir, entries)
    if progress:
        progress("done", len(wanted), len(wanted))
    assert manifest is not None
    return manifest


def export_demo(
    export_dir: str | Path, *, stages: Sequence[str] | None = None, seed: int = 0, exporter: str = "dynamo",
    progress: ProgressFn | None = None,
) -> Manifest:
    """Export the demo model's stages (seeded random weights, recorded by their state-dict hash)."""
    from foleyserve.pipeline.demo import demo_components

    from foleyserve.export.sources import demo_state_hashes

    components = demo_components(torch.device("cpu"), seed=seed)
    # The same hashes an engine start checks the export against.
    sources = {g: StageSource(f"demo (seed {seed})", {"state_dict": h}) for g, h in demo_state_hashes(seed).items()}
    return export_components(components, export_dir, sources=sources, stages=stages, exporter=exporter, seed=seed,
                             progress=progress)


def export_model_dir(
    model_dir: str | Path,
    export_dir: str | Path,
    *,
    model: str = "xxl",
    siglip_dir: str | Path | None = None,
    clap_dir: str | Path | None = None,
    stages: Sequence[str] | None = None,
    exporter: str = "dynamo",
    progress: ProgressFn | None = None,
) -> Manifest:
    """Export the official weights in ``model_dir`` (loaded in fp32 on the CPU), hashing each source file."""
    from foleyserve.config import EngineConfig
    from foleyserve.export.sources import hash_sources, stage_sources
    from foleyserve.pipeline.model_dir import load_components

    config = EngineConfig(model_dir=Path(model_dir), model=model, siglip_dir=siglip_dir, clap_dir=clap_dir)  # type: ignore[arg-type]
    files = stage_sources(config)
    wanted = list(GROUPS) if stages is None else list(stages)
    sources = {}
    for group in wanted:
        hashes, prints = hash_sources(files[group])
        sources[group] = StageSource(f"{Path(model_dir)} ({model})" if group == "dit" else str(files[group][0].parent), hashes, prints)
    components = load_components(model_dir, model=model, dtype=torch.float32, device=torch.device("cpu"),
                                 siglip_dir=siglip_dir, clap_dir=clap_dir)
    return export_components(components, export_dir, sources=sources, stages=wanted, exporter=exporter, progress=progress)


__all__ = ["StageSource", "export_components", "export_demo", "export_model_dir", "update_manifest"]
