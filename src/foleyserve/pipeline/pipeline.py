"""The staged generation pipeline and the engine API that the CLI, server and benchmarks share.

decode (one pass, 8 + 25 fps) -> SigLIP2 / Synchformer / CLAP -> sampler (DiT) -> DAC -> write/mux
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from foleyserve import media
from foleyserve.models.dit import FoleyDiT
from foleyserve.pipeline.features import (
    TextFeatures,
    VisualFeatures,
    siglip_features,
    sync_features,
    text_features,
)
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.sampler import initial_noise, sample_latents
from foleyserve.pipeline.stages import StageTimer

log = logging.getLogger("foleyserve")

MAX_SECONDS = 15.0  # the official decoder stops at the first frame after 15 s (15.04 s of audio)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RequestError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RequestError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_precision(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise RequestError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}") from None


@dataclass
class Components:
    """The loaded networks of one model, ready to run."""

    dit: FoleyDiT
    dac: torch.nn.Module
    synchformer: torch.nn.Module
    siglip: torch.nn.Module
    clap: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    is_demo: bool = False


@dataclass
class Engine:
    components: Components
    precision: str = "fp32"
    siglip_chunk: int = 16
    sync_chunk: int = 8
    warnings: list[str] = field(default_factory=list)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        model: str = "xxl",
        precision: str = "bf16",
        device: str | torch.device = "auto",
        siglip_dir: str | Path | None = None,
        clap_dir: str | Path | None = None,
    ) -> "Engine":
        """Load the official model folder (see :mod:`foleyserve.pipeline.model_dir`)."""
        from foleyserve.pipeline.model_dir import load_components

        dev = resolve_device(device)
        dtype = resolve_precision(precision)
        comps = load_components(model_dir, model=model, dtype=dtype, device=dev, siglip_dir=siglip_dir, clap_dir=clap_dir)
        return cls(components=comps, precision=precision)

    @classmethod
    def demo(cls, *, device: str | torch.device = "cpu", seed: int = 0) -> "Engine":
        """A tiny random-weight model of the real architecture: runs anywhere, outputs noise."""
        from foleyserve.pipeline.demo import demo_components

        return cls(components=demo_components(resolve_device(device), seed=seed), precision="fp32")

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def sample_rate(self) -> int:
        return int(self.components.dac.sample_rate)

    # -- stages ------------------------------------------------------------------------------

    def extract_visual(
        self, video: str | Path | bytes, timer: StageTimer | None = None, progress: ProgressFn | None = None
    ) -> tuple[VisualFeatures, media.DecodedVideo]:
        timer = timer or StageTimer(self.device)
        report = progress or (lambda _stage, _done, _total: None)
        c = self.components
        with timer.stage("decode"):
            report("decode", 0, 1)
            decoded = media.decode_frames(video, fps_list=(8, 25), max_seconds=MAX_SECONDS)
            media.check_min_frames(decoded.frames[25])
            report("decode", 1, 1)
        with timer.stage("siglip2"):
            sig = siglip_features(
                c.siglip, decoded.frames[8], device=self.device, chunk=self.siglip_chunk,
                progress=lambda done, total: report("siglip2", done, total),
            )
        with timer.stage("synchformer"):
            report("synchformer", 0, 1)
            autocast = torch.float16 if self.precision != "fp32" else None
            syn = sync_features(c.synchformer, decoded.frames[25], device=self.device, chunk=self.sync_chunk, autocast_dtype=autocast)
            report("synchformer", 1, 1)
        return VisualFeatures(siglip=sig, sync=syn, frames_25fps=len(decoded.frames[25])), decoded

    def extract_text(self, prompt: str, negative_prompt: str, timer: StageTimer | None = None) -> TextFeatures:
        timer = timer or StageTimer(self.device)
        with timer.stage("clap"):
            return text_features(self.components.tokenizer, self.components.clap, prompt, negative_prompt, device=self.device)

    def sample(
        self,
        visual: VisualFeatures,
        text: TextFeatures,
        *,
        seeds: list[int],
        steps: int,
        guidance: float,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """Latents [len(seeds), 128, La] for one feature set; each row has its own seeded noise."""
        noise = torch.cat([initial_noise(1, visual.latent_length, seed=s) for s in seeds]).to(self.device)
        cb = (lambda i, n, _x: progress("denoise", i, n)) if progress else None
        return sample_latents(
            self.components.dit,
            noise=noise,
            clip_feat=visual.siglip,
            sync_feat=visual.sync,
            text_feat=text.text,
            uncond_text_feat=text.uncond,
            steps=steps,
            guidance_scale=guidance,
            callback=cb,
        )

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 1, 960*La] float32 waveforms at 48 kHz (the DAC runs in fp32)."""
        return self.components.dac.decode(latents.float()).float().cpu()

    # -- the public entry points ---------------------------------------------------------------

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None) -> GenerationResult:
        request.validate()
        timer = StageTimer(self.device)
        visual, decoded = self.extract_visual(request.video, timer, progress)
        text = self.extract_text(request.prompt, request.negative_prompt, timer)
        with timer.stage("dit"):
            latents = self.sample(visual, text, seeds=[request.seed], steps=request.steps, guidance=request.guidance, progress=progress)
        with timer.stage("dac"):
            audio = self.decode_audio(latents)[0]
        return self._finish(request, audio, visual, decoded, timer)

    def generate_batch(self, requests: Iterable[GenerationRequest], progress: ProgressFn | None = None) -> list[GenerationResult | Exception]:
        """Run several requests; a failing request yields its exception and the others complete."""
        results: list[GenerationResult | Exception] = []
        for req in requests:
            try:
                results.append(self.generate(req, progress=progress))
            except (RequestError, media.MediaError) as e:
                results.append(e)
        return results

    # -- helpers -------------------------------------------------------------------------------

    def _finish(
        self,
        request: GenerationRequest,
        audio: torch.Tensor,
        visual: VisualFeatures,
        decoded: media.DecodedVideo,
        timer: StageTimer,
    ) -> GenerationResult:
        warnings: list[str] = []
        if self.components.is_demo:
            warnings.append("demo model: random weights, the audio is noise (use --model-dir for the real model)")
        covered = visual.latent_length * 960 / self.sample_rate
        if decoded.duration > covered + 0.05:
            warnings.append(
                f"the video is {decoded.duration:.2f} s long but HunyuanVideo-Foley generates at most "
                f"{MAX_SECONDS + 0.04:.2f} s: the audio covers 0-{covered:.2f} s and the rest of the video is silent"
            )
        files: list[Path] = []
        if request.output is not None:
            out = Path(request.output)
            with timer.stage("write"):
                if out.suffix.lower() == ".mp4":
                    source = request.video if isinstance(request.video, (bytes, bytearray)) else Path(request.video)
                    media.mux(source, audio, self.sample_rate, out, keep_original_audio_gain=request.keep_original_audio_gain)
                else:
                    media.write_audio(out, audio, self.sample_rate)
            files.append(out)
        for w in warnings:
            log.warning(w)
        return GenerationResult(
            waveform=audio,
            sample_rate=self.sample_rate,
            audio_seconds=audio.shape[-1] / self.sample_rate,
            video_seconds=decoded.duration,
            seed=request.seed,
            timings=timer.seconds(),
            memory=timer.as_dict(),
            files=files,
            warnings=warnings,
            model=self.components.name,
        )
