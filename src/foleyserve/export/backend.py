"""Run an engine's stages on ONNX Runtime (CPU or CUDA) or prebuilt TensorRT engines from an export folder.

:func:`attach_backend` swaps the loaded torch networks of an :class:`~foleyserve.pipeline.pipeline.Engine`
for adapters over exported graphs, stage by stage. Each adapter keeps the small interface the
pipeline calls (``dac.decode``, ``synchformer.encode``, ``siglip.encode_pixels``, CLAP's
``__call__``, the DiT's ``first_block``/``rest_blocks``/``head``), so the sampler, CFG, the step
cache and the batcher run unchanged on top. Tensors cross into ONNX Runtime by I/O binding on
their own device and come back through DLPack, so a CUDA step never copies through the host.

Before anything runs, the export is checked against the loaded model: a missing stage, weights
that changed since the export (checkpoint hashes), or graphs of another architecture fail with a
:class:`BackendError` that names the stage and the command that re-exports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from foleyserve.export.manifest import Manifest, ManifestError, StageEntry, read_manifest
from foleyserve.export.ort_runtime import StageRuntime
from foleyserve.export.sources import stage_sources, verify_sources
from foleyserve.export.stages import GROUPS, BackendError

if TYPE_CHECKING:
    from foleyserve.config import EngineConfig
    from foleyserve.pipeline.pipeline import Engine

log = logging.getLogger("foleyserve")


def providers_for(device: torch.device) -> list[Any]:
    """ONNX Runtime execution providers for a device, best first, CPU last.

    Raises :class:`BackendError` when the installed onnxruntime lacks the provider the device
    needs (the CPU wheel has no CUDA; ``pip install onnxruntime-gpu``).
    """
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    if "CUDAExecutionProvider" not in available:
        raise BackendError(
            f"device {device} needs ONNX Runtime's CUDAExecutionProvider, which this onnxruntime lacks "
            f"(it has {sorted(available)}): pip install onnxruntime-gpu, or run on device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_,
              torch.int32: np.int32}


class TorchStage:
    """One exported graph called with torch tensors; outputs are torch tensors on the same device.

    Inputs are bound in place (``data_ptr``) and outputs are left for ONNX Runtime to allocate on
    the device and handed over by DLPack, so nothing is copied on CPU or through the host on CUDA.
    """

    def __init__(self, runtime: StageRuntime, device: torch.device) -> None:
        self.runtime = runtime
        self.device = device
        self._dtypes = {t.name: np.dtype(t.dtype) for t in runtime.entry.inputs}
        self._outputs = [t.name for t in runtime.entry.outputs]
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0 if device.type == "cuda" else 0

    @property
    def input_names(self) -> list[str]:
        return list(self._dtypes)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = sorted(set(self._dtypes) - set(inputs))
        if missing:
            raise ValueError(f"stage {self.runtime.entry.stage!r} needs inputs {missing}")
        binding = self.runtime.session.io_binding()
        keep = []  # inputs must outlive the run (bound by address)
        for name, want in self._dtypes.items():
            value = inputs[name]
            if value.device != self.device:
                value = value.to(self.device)
            if np.dtype(_NP_DTYPES.get(value.dtype, object)) != want:
                value = value.to(_torch_dtype(want))
            value = value.contiguous()
            keep.append(value)
            binding.bind_input(name, self._device_type, self._device_id, want, list(value.shape), value.data_ptr())
        for name in self._outputs:
            binding.bind_output(name, self._device_type, self._device_id)
        self.runtime.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: torch.from_dlpack(v) for name, v in zip(self._outputs, values)}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    for t, n in _NP_DTYPES.items():
        if np.dtype(n) == dtype:
            return t
    raise TypeError(f"no torch dtype for {dtype}")


# -- adapters -----------------------------------------------------------------------------------


class OrtDac:
    """The DAC decoder's ``decode`` over an exported graph (the pipeline's only use of the DAC)."""

    def __init__(self, stage: TorchStage) -> None:
        extra = stage.runtime.entry.extra
        self.stage = stage
        self.sample_rate = int(extra["sample_rate"])
        self.hop_length = int(extra["hop_length"])
        self.latent_dim = int(extra["latent_dim"])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.stage(z=z.float())["audio"]


class OrtSynchformer:
    """Synchformer's ``encode``: the same windowing as torch (``encode_windows``), graphs per chunk."""

    def __init__(self, stage: TorchStage) -> None:
        self.stage = stage
        self.embed_dim = int(stage.runtime.entry.extra["embed_dim"])

    def encode(self, frames: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        from foleyserve.models.synchformer import encode_windows

        return encode_windows(lambda seg: self.stage(segments=seg[:, 0].float())["features"].unsqueeze(1), frames, batch_size)


class OrtSiglip:
    """SigLIP2's pooled image features (``encode_pixels``, what ``siglip_features`` calls)."""

    def __init__(self, stage: TorchStage, config: Any) -> None:
        self.stage = stage
        self.config = config

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.stage(pixel_values=pixel_values.float())["image_features"]


class OrtClapText:
    """CLAP's text model as ``encode_prompts`` calls it: ``model(**tokens).last_hidden_state``."""

    training = False

    def __init__(self, stage: TorchStage, config: Any) -> None:
        self.stage = stage
        self.config = config

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        out = self.stage(input_ids=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(last_hidden_state=out["last_hidden_state"])


@dataclass
class OrtDiTStep:
    """The DiT's per-step parts over the three exported graphs (see :mod:`.dit_onnx`)."""

    first: TorchStage
    rest: TorchStage
    head_stage: TorchStage
    names: list[str] = field(default_factory=list)
    # The conditions of the running loop and their graph inputs: a loop hands the same object to
    # every step, so the filled-in identity gather and all-true mask are built once, not twice a step.
    _last: tuple[Any, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def _cond(self, c, stage: TorchStage) -> dict[str, torch.Tensor]:
        from foleyserve.export.dit_onnx import condition_tensors

        if self._last is None or self._last[0] is not c:
            self._last = (c, dict(zip(self.names, condition_tensors(c))))
        values = self._last[1]
        return {n: values[n] for n in stage.input_names if n in values}

    def first_block(self, x: torch.Tensor, t: torch.Tensor, c) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.first(x=x.float(), t=t.float(), **self._cond(c, self.first))
        return out["audio_stream"], out["visual_stream"], out["vec"]

    def rest_blocks(self, audio: torch.Tensor, visual: torch.Tensor, vec: torch.Tensor, c) -> torch.Tensor:
        return self.rest(audio_stream=audio, visual_stream=visual, vec=vec, **self._cond(c, self.rest))["hidden"]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_stage(hidden=hidden)["velocity"]


def _free_step_weights(dit: torch.nn.Module) -> int:
    """Drop the DiT weights the exported step graphs hold; returns the bytes freed.

    Each such parameter becomes an empty tensor of its dtype and device, so ``dit.dtype`` and
    ``dit.device`` still answer, while ``prepare_conditions`` keeps everything it reads.
    """
    from foleyserve.export.dit_onnx import conditioning_parameter_names

    keep = conditioning_parameter_names(dit)
    freed = 0
    for name, p in dit.named_parameters():
        if name not in keep and p.numel():
            freed += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return freed


# -- attaching ----------------------------------------------------------------------------------


def reexport_command(config: "EngineConfig", groups: Sequence[str]) -> str:
    source = "--demo" if config.demo else f"--model-dir {config.model_dir}" + (f" --model {config.model}" if config.model != "xxl" else "")
    stages = "" if list(groups) == list(GROUPS) else f" --stages {','.join(groups)}"
    return f"foleyserve export {source} --out {config.export_dir}{stages}"


def _check_shape_fit(group: str, entries: Mapping[str, StageEntry], engine: "Engine") -> str | None:
    """Why the graphs of ``group`` cannot serve this engine's model, or None."""
    c = engine.components
    if group == "dit":
        extra = entries["dit_first_block"].extra
        want = (len(c.dit.triple_blocks), int(c.dit.config.hidden_size), int(c.dit.config.audio_vae_latent_dim))
        got = (int(extra["n_triple_blocks"]), int(extra["hidden_size"]), int(extra["latent_dim"]))
        if want != got:
            return f"graphs are of a DiT with (triple blocks, width, latent dim) {got}, the model has {want}"
    if group == "dac":
        extra = entries["dac_decoder"].extra
        want = (int(c.dac.latent_dim), int(c.dac.hop_length), int(c.dac.sample_rate))
        got = (int(extra["latent_dim"]), int(extra["hop_length"]), int(extra["sample_rate"]))
        if want != got:
            return f"graph decodes (latent dim, hop, rate) {got}, the model has {want}"
    return None


def check_export(config: "EngineConfig") -> tuple[Manifest, list[str]]:
    """The manifest and the stages the backend will run; fast (no hashing, no session), so the CLI
    calls it before loading any model. Raises :class:`BackendError` naming the stage and the fix."""
    if config.export_dir is None:
        raise BackendError(f"backend {config.backend} needs export_dir (--export-dir): make one with "
                           f"`{reexport_command(config, list(GROUPS))}`")
    try:
        manifest: Manifest = read_manifest(config.export_dir)
    except ManifestError as exc:
        raise BackendError(f"{exc}; make the export with `{reexport_command(config, list(GROUPS))}`") from None
    present = [g for g, stages in GROUPS.items() if all(s in manifest.stages for s in stages)]
    groups = list(config.backend_stages) if config.backend_stages is not None else present
    if not groups:
        raise BackendError(f"{config.export_dir} has no complete stage; re-export: `{reexport_command(config, list(GROUPS))}`")
    for group in groups:
        if group not in GROUPS:
            raise BackendError(f"unknown stage {group!r} in backend_stages: choose from {', '.join(GROUPS)}")
        if group not in present:
            raise BackendError(f"stage {group} is not in {config.export_dir}; export it: `{reexport_command(config, [group])}`")
    return manifest, groups


def attach_backend(engine: "Engine", config: "EngineConfig") -> dict[str, Any]:
    """Run the stages of ``config.backend_stages`` (every exported one when None) from ``config.export_dir``.

    Checks the export first (see the module docstring); returns the report the engine keeps as
    ``engine.backend_report``: per stage, its graphs, providers and the parity measured at export.
    """
    manifest, groups = check_export(config)
    sources = stage_sources(config)
    for group in groups:
        entries = {s: manifest.stages[s] for s in GROUPS[group]}
        problem = verify_sources(group, entries, sources.get(group), engine)
        if problem is None:
            problem = _check_shape_fit(group, entries, engine)
        if problem is not None:
            raise BackendError(f"stage {group} in {config.export_dir} is stale: {problem}; re-export: "
                               f"`{reexport_command(config, [group])}`")
    device = engine.device
    open_stage = _tensorrt_opener(config, manifest, device) if config.backend == "tensorrt" else None
    providers = providers_for(device) if open_stage is None else []
    report: dict[str, Any] = {"backend": config.backend, "export_dir": str(config.export_dir), "stages": {}}
    for group in groups:
        stages: dict[str, Any] = {}
        for name in GROUPS[group]:
            if open_stage is not None:
                stages[name] = open_stage(name)
                continue
            try:
                runtime = StageRuntime.load(config.export_dir, name, manifest=manifest, providers=providers)
            except ManifestError as exc:
                raise BackendError(f"stage {group}: {exc}; re-export: `{reexport_command(config, [group])}`") from None
            stages[name] = TorchStage(runtime, device)
        _install(group, stages, engine)
        first = stages[GROUPS[group][0]]
        session = first.runtime.session
        report["stages"][group] = {
            "graphs": [manifest.stages[n].file for n in GROUPS[group]],
            "providers": session.get_providers() if session is not None else ["TensorRT"],
            "precision": manifest.stages[GROUPS[group][0]].extra.get("precision", "fp32"),
            "parity_at_export": manifest.stages[GROUPS[group][0]].parity,
        }
    log.info("backend %s runs %s from %s", config.backend, ", ".join(groups), config.export_dir)
    return report


def _tensorrt_opener(config: "EngineConfig", manifest: Manifest, device: torch.device):
    """A function graph name -> TrtStage over the engines built for this GPU and TensorRT version."""
    from foleyserve.export.tensorrt_build import find_engine_dir, tensorrt_unavailable

    if device.type != "cuda":
        raise BackendError("the tensorrt backend needs a CUDA GPU (device is cpu): use backend onnxruntime on a CPU")
    why = tensorrt_unavailable()
    if why:
        raise BackendError(why)
    import json

    from foleyserve.export.tensorrt_runtime import TrtStage

    folder = find_engine_dir(config.export_dir)  # type: ignore[arg-type]
    build = f"`foleyserve export --out {config.export_dir} --tensorrt`"
    if folder is None:
        raise BackendError(f"{config.export_dir} has no TensorRT engines for this GPU and TensorRT version: build them with {build}")
    ranges = json.loads((folder / "build.json").read_text())["profiles"]

    def open_stage(name: str):
        plan = folder / f"{name}.plan"
        if not plan.is_file():
            raise BackendError(f"{folder} has no engine for {name}: build it with {build}")
        return TrtStage(plan, manifest.stages[name], ranges, device)

    return open_stage


def _install(group: str, stages: Mapping[str, TorchStage], engine: "Engine") -> None:
    c = engine.components
    if group == "dac":
        c.dac = OrtDac(stages["dac_decoder"])  # type: ignore[assignment]
    elif group == "synchformer":
        c.synchformer = OrtSynchformer(stages["synchformer"])  # type: ignore[assignment]
    elif group == "siglip":
        tower = getattr(c.siglip, "vision_model", c.siglip)
        c.siglip = OrtSiglip(stages["siglip_vision"], tower.config)  # type: ignore[assignment]
    elif group == "clap":
        c.clap = OrtClapText(stages["clap_text"], c.clap.config)  # type: ignore[assignment]
    elif group == "dit":
        from foleyserve.export.dit_onnx import condition_names

        step = OrtDiTStep(stages["dit_first_block"], stages["dit_rest_blocks"], stages["dit_head"],
                          names=condition_names(len(c.dit.triple_blocks)))
        freed = _free_step_weights(c.dit)
        # Instance attributes shadow the methods predict_flow calls, so every caller of the DiT
        # (sampler, step cache, batcher) runs the graphs without knowing it.
        c.dit.first_block, c.dit.rest_blocks, c.dit.head = step.first_block, step.rest_blocks, step.head  # type: ignore[method-assign]
        c.dit.exported_step = step  # type: ignore[attr-defined]
        log.info("dit: %.1f MB of step weights left to the exported graphs", freed / 1e6)


__all__ = ["BackendError", "TorchStage", "attach_backend", "providers_for", "reexport_command"]
