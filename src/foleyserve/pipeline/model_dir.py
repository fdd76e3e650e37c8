"""Find and load the official model folder.

Layout of ``tencent/HunyuanVideo-Foley`` as downloaded from Hugging Face::

    hunyuanvideo_foley.pth        XXL denoiser (or hunyuanvideo_foley_xl.pth for XL)
    vae_128d_48k.pth              DAC-VAE
    synchformer_state_dict.pth    Synchformer

Each may also be the ``.safetensors`` that ``foleyserve convert`` writes next to it (preferred: it
memory-maps). SigLIP2 (``google/siglip2-base-patch16-512``) and CLAP (``laion/larger_clap_general``)
come from their own Hugging Face repositories; they are looked up inside the model folder, at an
explicit path, or in the local Hugging Face cache — never on the network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from foleyserve.models.dit import build_dit, xl_config, xxl_config
from foleyserve.models.encoders import load_clap_text, load_siglip_vision
from foleyserve.models.loading import CheckpointError, load_into, read_checkpoint
from foleyserve.models.synchformer import build_synchformer_visual, split_synchformer_state_dict
from foleyserve.models.vae import dac_from_checkpoint
from foleyserve.pipeline.components import Components

log = logging.getLogger("foleyserve")

DIT_FILES = {"xxl": "hunyuanvideo_foley", "xl": "hunyuanvideo_foley_xl"}
DIT_CONFIGS = {"xxl": xxl_config, "xl": xl_config}
VAE_FILE = "vae_128d_48k"
SYNCHFORMER_FILE = "synchformer_state_dict"
SIGLIP_REPO = "google/siglip2-base-patch16-512"
CLAP_REPO = "laion/larger_clap_general"
OFFICIAL_REPO = "tencent/HunyuanVideo-Foley"


def how_to_get(model_dir: str | Path) -> str:
    """How to fetch the official weights into ``model_dir`` (the user's own path, in the command)."""
    return (
        f"download the official weights with `hf download {OFFICIAL_REPO} --local-dir {model_dir}` "
        f"on a machine with internet access (see README, 'Run the real model')"
    )


class ModelFolderError(FileNotFoundError):
    """A model file is missing or unusable; the message names it and says how to get it."""


def _weights_file(model_dir: Path, stem: str) -> Path | None:
    for suffix in (".safetensors", ".pth"):
        p = model_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _weights_files(model_dir: Path, stems: list[str]) -> list[Path]:
    """The file of each stem; one error that names every missing file."""
    found = [_weights_file(model_dir, stem) for stem in stems]
    missing = [str(model_dir / f"{stem}.pth") for stem, p in zip(stems, found) if p is None]
    if missing:
        raise ModelFolderError(f"{', '.join(missing)} not found: {how_to_get(model_dir)}")
    return found  # type: ignore[return-value]


def _read_weights(path: Path):
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise ModelFolderError(
            f"{e}; the file is damaged or not the official one: delete it and {how_to_get(path.parent)}"
        ) from None


def _load_hf(load, path: Path, repo_id: str):
    try:
        return load()
    except ModelFolderError:
        raise
    except (OSError, ValueError, CheckpointError) as e:
        # A partial download (config.json but no weights), damaged files, a different model.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(
            f"cannot load {repo_id} from {path} ({first}); download it again with "
            f"`hf download {repo_id} --local-dir {path}`"
        ) from None


def _hf_cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return roots


def find_hf_model(repo_id: str, model_dir: Path | None, explicit: str | Path | None) -> Path:
    """A local folder holding ``repo_id``'s config and weights, without touching the network."""
    if explicit is not None:
        p = Path(explicit)
        if not (p / "config.json").is_file():
            raise ModelFolderError(f"{p} has no config.json: give the folder that holds {repo_id}'s files")
        return p
    name = repo_id.split("/")[1]
    candidates: list[Path] = []
    if model_dir is not None:
        candidates += [model_dir / name, model_dir / repo_id.replace("/", "--"), model_dir / repo_id]
    for root in _hf_cache_roots():
        snap_root = root / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        ref = root / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            candidates.append(snap_root / ref.read_text().strip())
        if snap_root.is_dir():
            candidates += sorted(snap_root.iterdir())
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise ModelFolderError(
        f"{repo_id} not found (looked in {model_dir / name if model_dir else 'no model folder'} and the Hugging Face cache): "
        f"download it with `hf download {repo_id} --local-dir {model_dir / name if model_dir else 'DIR'}`"
    )


def check_model_folder(
    model_dir: str | Path,
    *,
    model: str = "xxl",
    siglip_dir: str | Path | None = None,
    clap_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Every file a model needs, found without reading any weights (milliseconds).

    Returns the paths by role (``dit``, ``vae``, ``synchformer``, ``siglip``, ``clap``); raises
    :class:`ModelFolderError` naming everything missing and the download command for the folder
    the user gave. :func:`load_components` runs it first; the CLI runs it before anything else.
    """
    root = Path(model_dir)
    if root.exists() and not root.is_dir():
        raise ModelFolderError(f"model folder {root} is a file, not a folder: pass the folder that holds the weights, or {how_to_get(root)}")
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist: {how_to_get(root)}")
    if model not in DIT_FILES:
        raise ModelFolderError(f"unknown model {model!r}: choose xxl or xl")
    dit, vae, sync = _weights_files(root, [DIT_FILES[model], VAE_FILE, SYNCHFORMER_FILE])
    return {
        "dit": dit, "vae": vae, "synchformer": sync,
        "siglip": find_hf_model(SIGLIP_REPO, root, siglip_dir),
        "clap": find_hf_model(CLAP_REPO, root, clap_dir),
    }


def load_components(
    model_dir: str | Path,
    *,
    model: str = "xxl",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device = torch.device("cpu"),
    siglip_dir: str | Path | None = None,
    clap_dir: str | Path | None = None,
) -> Components:
    """Load every network of the official release into ``device``; the DiT in ``dtype``."""
    # Resolve every file first so a missing one is reported before minutes of loading.
    files = check_model_folder(model_dir, model=model, siglip_dir=siglip_dir, clap_dir=clap_dir)
    dit_path, vae_path, sync_path = files["dit"], files["vae"], files["synchformer"]
    siglip_path, clap_path = files["siglip"], files["clap"]

    dit = build_dit(DIT_CONFIGS[model](), dtype=dtype, device="meta")
    sd, _ = _read_weights(dit_path)
    load_into(dit, sd, strict=True, dtype=dtype, device=device)
    del sd

    sd, meta = _read_weights(vae_path)
    if "config" not in meta:
        raise ModelFolderError(
            f"{vae_path} holds no DAC settings (metadata.kwargs), so it is not the official {VAE_FILE}.pth: "
            f"delete it and {how_to_get(vae_path.parent)}"
        )
    # Inference only decodes: the encoder (~80% of the file) is neither built nor loaded.
    dac = dac_from_checkpoint({"state_dict": sd, "metadata": {"kwargs": meta["config"]}}, decoder_only=True).to(device).eval()
    del sd

    sd, _ = _read_weights(sync_path)
    visual, ignored = split_synchformer_state_dict(sd)
    log.info("synchformer: %d audio-branch / sync-head tensors not needed for Foley, skipped", len(ignored))
    synchformer = build_synchformer_visual()
    synchformer.load_state_dict(visual, strict=True)
    synchformer = synchformer.to(device).eval()
    del sd, visual

    siglip = _load_hf(lambda: load_siglip_vision(siglip_path, device=device), siglip_path, SIGLIP_REPO)
    tokenizer, clap = _load_hf(lambda: load_clap_text(clap_path, device=device), clap_path, CLAP_REPO)
    return Components(
        dit=dit.eval(),
        dac=dac,
        synchformer=synchformer,
        siglip=siglip,
        clap=clap,
        tokenizer=tokenizer,
        name=f"hunyuanvideo-foley-{model}",
        device=device,
    )
