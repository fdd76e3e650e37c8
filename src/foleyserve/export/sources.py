"""Which checkpoint files each exported stage came from, and whether they are still the same.

An export records the sha256 of every source file (``StageEntry.source_hashes``) and its size and
mtime (``extra["source_fingerprints"]``). Checking a 10 GB checkpoint's sha256 takes tens of
seconds, so an engine start re-hashes a file only when its size or mtime changed; a file that was
replaced in place with the same size and mtime is the one case this trusts. The demo's weights
live only in memory and are checked by their state-dict hash.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from foleyserve.export.manifest import StageEntry, sha256_file, sha256_state_dict

if TYPE_CHECKING:
    from foleyserve.config import EngineConfig

# Files of a Hugging Face model folder that decide its numbers.
_HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def _hf_files(folder: Path) -> list[Path]:
    found = [folder / n for n in _HF_FILES if (folder / n).is_file()]
    found += sorted(p for p in folder.glob("model-*.safetensors") if p.is_file())
    return found


def stage_sources(config: "EngineConfig") -> dict[str, list[Path]]:
    """Stage -> the files its weights come from; {} for the demo (weights made in memory)."""
    if config.demo or config.model_dir is None:
        return {}
    from foleyserve.pipeline.model_dir import check_model_folder

    files = check_model_folder(config.model_dir, model=config.model, siglip_dir=config.siglip_dir, clap_dir=config.clap_dir)
    return {
        "dit": [files["dit"]], "dac": [files["vae"]], "synchformer": [files["synchformer"]],
        "siglip": _hf_files(files["siglip"]), "clap": _hf_files(files["clap"]),
    }


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def hash_sources(paths: list[Path]) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(name -> sha256, name -> [size, mtime_ns]) of a stage's source files, for its manifest entry."""
    return {p.name: sha256_file(p) for p in paths}, {p.name: _fingerprint(p) for p in paths}


@functools.lru_cache(maxsize=2)
def demo_state_hashes(seed: int = 0) -> dict[str, str]:
    """The state-dict hash of each stage of the demo model, as built (before the engine fuses the
    DiT's layout). Built once per process: every stage of an engine start checks against it."""
    import torch

    from foleyserve.pipeline.demo import demo_components

    c = demo_components(torch.device("cpu"), seed=seed)
    modules = {"dit": c.dit, "dac": c.dac, "synchformer": c.synchformer, "siglip": c.siglip, "clap": c.clap}
    return {group: sha256_state_dict(m.state_dict()) for group, m in modules.items()}


def verify_sources(group: str, entries: Mapping[str, StageEntry], paths: list[Path] | None, engine: Any) -> str | None:
    """Why the export of ``group`` does not match the weights the engine loaded, or None."""
    entry = next(iter(entries.values()))
    recorded = entry.source_hashes
    if not paths:  # the demo: recompute its seeded weights' hash
        if not engine.components.is_demo:
            return "the engine's weights have no source files to compare"
        if recorded.get("state_dict") != demo_state_hashes()[group]:
            return f"it was exported from {entry.source!r}, not this foleyserve's demo weights"
        return None
    fingerprints = entry.extra.get("source_fingerprints", {})
    names = sorted(p.name for p in paths)
    if sorted(recorded) != names:
        return f"it was exported from {sorted(recorded)}, the model now has {names}"
    for path in paths:
        if fingerprints.get(path.name) == _fingerprint(path):
            continue
        if sha256_file(path) != recorded[path.name]:
            return f"{path} changed since the export (sha256 differs)"
    return None
