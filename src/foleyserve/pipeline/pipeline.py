"""The staged generation pipeline and the engine API that the CLI, server and benchmarks share.

decode (one pass, 8 + 25 fps) -> SigLIP2 / Synchformer / CLAP -> sampler (DiT) -> DAC -> write/mux
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from foleyserve import media
from foleyserve.config import EngineConfig
# Re-exported: Components lived here before it moved out to break the loaders' import circle.
from foleyserve.pipeline.components import Components
# Re-exported: the device and precision resolvers live in devices.py.
from foleyserve.pipeline.devices import PRECISIONS, resolve_device, resolve_precision  # noqa: F401
from foleyserve.pipeline import longform
from foleyserve.pipeline.features import (
    TextFeatures,
    VisualFeatures,
    encoder_autocast,
    siglip_features,
    sync_features,
    text_features,
)
from foleyserve.pipeline.mastering import master
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.sampler import initial_noise, sample_latents
from foleyserve.pipeline.stepcache import StepCache
from foleyserve.pipeline import textonly

if TYPE_CHECKING:
    from foleyserve.pipeline.stepgraph import StepGraphs
from foleyserve.pipeline.stages import StageTimer

log = logging.getLogger("foleyserve")

MAX_SECONDS = 15.0  # the official decoder stops at the first frame after 15 s (15.04 s of audio)
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


# A compiled step is one graph per shape bucket; CLAP prompts vary in token count, so with compile
# on every prompt is padded (and masked) to CLAP's maximum instead of making a bucket per length.
TEXT_BUCKET = 77


def _pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the token axis of ``[B, L, C]`` to ``n`` (the caller masks the padding)."""
    return torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1]))


@dataclass
class PreparedJob:
    """One request after its encoders ran: everything the batched denoising loop needs."""

    request: GenerationRequest
    visual: VisualFeatures
    text: TextFeatures
    decoded: media.DecodedVideo
    timer: StageTimer

    @property
    def latent_length(self) -> int:
        return self.visual.latent_length

    def batch_key(self) -> tuple[int, int, bool, int, int]:
        """Jobs with equal keys can share one denoising loop: the model uses no attention mask over
        audio or visual tokens, so only equal latent lengths and equal SigLIP/Synchformer token
        counts batch (a 1.04 s clip and a 1.0 s one can share a latent length but not a frame count);
        the schedule fixes the step count; guided and unguided rows have different batch layouts."""
        return (
            self.latent_length,
            self.request.steps,
            float(self.request.guidance) > 1.0,
            int(self.visual.siglip.shape[1]),
            int(self.visual.sync.shape[1]),
        )


@dataclass
class Engine:
    """A loaded HunyuanVideo-Foley model and the cost options it runs with.

    Build one with :meth:`from_pretrained` (an official weights folder), :meth:`from_config`
    (an :class:`~foleyserve.config.EngineConfig`, as the CLI and server do) or :meth:`demo` (tiny
    random weights); then call :meth:`generate` per request, or :meth:`generate_batch` to share
    denoising loops between requests. Loading dominates the cost of a single request, so keep the
    engine. An engine runs one request at a time (the server's batcher serialises access).

    The stages are public for callers that cache or batch themselves: :meth:`decode`,
    :meth:`encode_visual`, :meth:`extract_text`, :meth:`prepare`, :meth:`sample_jobs`,
    :meth:`finish`.
    """

    components: Components
    precision: str = "fp32"
    # The encoders' precision (EngineConfig.encoder_precision): "auto" is the official handling.
    encoder_precision: str = "auto"
    siglip_chunk: int = 16
    sync_chunk: int = 8
    # Step cache threshold (see pipeline/stepcache.py); None = off, the exact default.
    step_cache: float | None = None
    warnings: list[str] = field(default_factory=list)
    last_step_cache_report: dict | None = None
    policy_report: dict | None = None
    offload: str = "none"
    # The compiled step runner (pipeline/stepgraph.py) when compile is on; None runs eagerly.
    step_graphs: "StepGraphs | None" = None
    compile_cache: Path | None = None
    # Where the weights came from: best-of loads its scorers (pipeline/bestof.py) from here, once.
    model_dir: Path | None = None
    clap_dir: Path | None = None
    scorers: object | None = field(default=None, repr=False)  # scoring.Scorers, loaded on first use
    # Which stages run exported graphs, on which providers (foleyserve.export.backend); None = all torch.
    backend_report: dict | None = None
    # The turbo tier's student (distill/student.py): its step count and no CFG replace each request's.
    student_recipe: object | None = None
    _lender: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Every engine runs the inference layout of the DiT (tap-GEMM convs, fused w1|w3), so the
        # same seed gives the same numbers whichever way the engine was built.
        # CPUs run the fused convs in convolution layout (oneDNN beats the tap GEMM there).
        fuse = getattr(self.components.dit, "fuse_for_inference", None)
        if fuse is not None:
            fuse(conv_layout=self.device.type == "cpu")

    @property
    def compiled(self) -> bool:
        """Whether the denoising step runs compiled (``compile`` was on)."""
        return self.step_graphs is not None

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
        engine = cls(components=comps, precision=precision, model_dir=Path(model_dir), clap_dir=clap_dir and Path(clap_dir))
        if precision not in ("fp32", "bf16", "fp16"):
            # fp8 policies convert the bf16-loaded DiT; the plain dtypes are exact as loaded
            # (the official numerics: every DiT layer in that dtype).
            from foleyserve.config import EngineConfig

            engine.configure(EngineConfig(model_dir=Path(model_dir), precision=precision, device=str(dev)))
        return engine

    @classmethod
    def from_config(cls, config: "EngineConfig") -> "Engine":
        """Build an engine from typed options (CLI flags or a deployment profile)."""
        config.validate()
        if config.demo:
            engine = cls.demo(device=config.device if config.device != "auto" else "cpu")
        else:
            from foleyserve.pipeline.model_dir import load_components

            dev = resolve_device(config.device)
            # With offload the weights' home is host RAM: load there, so the device never holds
            # more than the running stage (even during start-up).
            comps = load_components(
                config.model_dir,  # type: ignore[arg-type]
                model=config.model,
                dtype=resolve_precision(config.precision),
                device=dev if config.offload == "none" else torch.device("cpu"),
                siglip_dir=config.siglip_dir,
                clap_dir=config.clap_dir,
            )
            comps.device = dev
            engine = cls(components=comps, precision=config.precision, model_dir=Path(config.model_dir),  # type: ignore[arg-type]
                         clap_dir=config.clap_dir and Path(config.clap_dir))
        engine.configure(config)
        if config.backend != "torch":
            # Exported graphs replace the torch networks stage by stage. The runtime layer is
            # imported by name only here: the engine core itself knows nothing of ONNX.
            import importlib

            attach = importlib.import_module("foleyserve.export.backend").attach_backend
            engine.backend_report = attach(engine, config)
        return engine

    def configure(self, config: "EngineConfig") -> "Engine":
        """Apply the cost options to the loaded models: precision policy, step cache, offload, compile.

        Call once, right after loading (``from_config`` does).
        """
        from foleyserve.config import ConfigError
        from foleyserve.pipeline.offload import apply_offload
        from foleyserve.precision import apply_policy

        config.validate()
        if config.compile and config.offload == "sequential":
            raise ConfigError("compile and offload=sequential do not combine (streamed blocks change weights under the graph); pick one")
        c = self.components
        if config.student is not None or config.light_decoder is not None:
            from foleyserve.distill.turbo import apply_turbo

            apply_turbo(self, config.student, config.light_decoder)  # before the policy, so it applies to the student
        report = apply_policy(c.dit, config.precision, keep_fp32=config.keep_fp32)
        self.policy_report = report.as_dict()
        self.precision = config.precision
        self.step_cache = config.step_cache
        if config.encoder_precision != "auto" and self.encoder_precision == "auto":
            self.encoder_precision = config.encoder_precision
            # Other encoder numbers are other features: the name keys every cache level.
            c.name = f"{c.name} + encoders {config.encoder_precision}"
        models = {"dit": c.dit, "dac": c.dac, "synchformer": c.synchformer, "siglip": c.siglip, "clap": c.clap}
        self._lender = apply_offload(config.offload, self.device, models, dit=c.dit)
        self.offload = config.offload
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.device.type == "cuda":
            # "fp32" means fp32: TF32 would round the fp32 policy's matmuls and convs (and the DAC,
            # which always runs in fp32) to 10-bit mantissas. The low-precision policies are
            # unaffected: their GEMMs are bf16/fp8 either way.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if config.compile:
            from foleyserve.pipeline.stepgraph import StepGraphs, load_compile_artifacts

            if config.compile_cache is not None and load_compile_artifacts(config.compile_cache):
                log.info("compile artifacts loaded from %s", config.compile_cache)
            self.compile_cache = config.compile_cache
            # A captured graph reads the weights at the addresses they had at capture; stage
            # offload lends the DiT anew for every request, so it compiles without capture.
            cuda_graphs = False if config.offload != "none" else None
            self.step_graphs = StepGraphs(max_graphs=config.max_graphs, cuda_graphs=cuda_graphs)
        return self

    def warm_up(self, seconds: Iterable[float], *, batch_sizes: Iterable[int] = (1,), steps: int = 1,
                progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
        """Compile (and on CUDA capture) the denoising step for clips of these lengths and batch
        sizes, so the first real request of each bucket pays nothing. Returns one record per bucket
        (seconds, batch, wall time). With ``compile_cache`` set, the artifacts are saved after.

        ``progress(done, total, what)`` is called before each bucket and at the end (a server's
        /readyz shows it).
        """
        from foleyserve.pipeline.warmup import warm_up

        return warm_up(self, seconds, batch_sizes=batch_sizes, steps=steps, progress=progress)

    def _on_device(self, module: torch.nn.Module):
        """The stage lender's context for ``module`` (a no-op without offload)."""
        if self._lender is None:
            return contextlib.nullcontext(module)
        return self._lender.on_device(module)  # type: ignore[attr-defined]

    @classmethod
    def demo(cls, *, device: str | torch.device = "cpu", seed: int = 0) -> "Engine":
        """A tiny random-weight model of the real architecture: runs anywhere, outputs noise."""
        from foleyserve.pipeline.demo import demo_components

        return cls(components=demo_components(resolve_device(device), seed=seed), precision="fp32")

    @property
    def device(self) -> torch.device:
        """Where the models run."""
        return self.components.device

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz (48000 for the official DAC)."""
        return int(self.components.dac.sample_rate)

    # -- stages ------------------------------------------------------------------------------

    def extract_visual(
        self, video: str | Path | bytes, timer: StageTimer | None = None, progress: ProgressFn | None = None
    ) -> tuple[VisualFeatures, media.DecodedVideo]:
        """Decode a video and run both visual encoders on it."""
        timer = timer or StageTimer(self.device)
        decoded = self.decode(video, timer, progress)
        return self.encode_visual(decoded, timer, progress), decoded

    def decode(
        self,
        video: str | Path | bytes | None,
        timer: StageTimer | None = None,
        progress: ProgressFn | None = None,
        *,
        max_seconds: float = MAX_SECONDS,
    ) -> media.DecodedVideo:
        """Decode the frames both visual encoders consume (8 and 25 fps), checking there are enough."""
        if video is None:  # text to audio: no frames, only the length (pipeline/textonly.py)
            return textonly.no_video_clip(max_seconds)
        timer = timer or StageTimer(self.device)
        report = progress or (lambda _stage, _done, _total: None)
        with timer.stage("decode"):
            report("decode", 0, 1)
            decoded = media.decode_frames(video, fps_list=(8, 25), max_seconds=min(max_seconds, MAX_SECONDS))
            media.check_min_frames(decoded.frames[25])
            report("decode", 1, 1)
        return decoded

    def encode_visual(
        self, decoded: media.DecodedVideo, timer: StageTimer | None = None, progress: ProgressFn | None = None
    ) -> VisualFeatures:
        """SigLIP2 and Synchformer features of decoded frames."""
        if isinstance(decoded, textonly.NoVideoClip):  # the learned empty features stand in for a video
            return textonly.empty_visual(self.components.dit, decoded.seconds, self.device)
        timer = timer or StageTimer(self.device)
        report = progress or (lambda _stage, _done, _total: None)
        c = self.components
        with timer.stage("siglip2"):
            with self._on_device(c.siglip), encoder_autocast(self.device, self._encoder_dtype()):
                sig = siglip_features(
                    c.siglip, decoded.frames[8], device=self.device, chunk=self.siglip_chunk,
                    progress=lambda done, total: report("siglip2", done, total),
                )
        with timer.stage("synchformer"):
            report("synchformer", 0, 1)
            autocast = self._encoder_dtype(official=torch.float16 if self.precision != "fp32" and self.device.type == "cuda" else None)
            with self._on_device(c.synchformer):
                syn = sync_features(
                    c.synchformer, decoded.frames[25], device=self.device, chunk=self.sync_chunk, autocast_dtype=autocast
                )
            report("synchformer", 1, 1)
        return VisualFeatures(siglip=sig, sync=syn, frames_25fps=len(decoded.frames[25]))

    def _encoder_dtype(self, official: torch.dtype | None = None) -> torch.dtype | None:
        """The autocast dtype of an encoder: ``official`` (the official handling) under "auto"."""
        if self.encoder_precision == "auto":
            return official
        return None if self.encoder_precision == "fp32" else resolve_precision(self.encoder_precision)

    def extract_text(self, prompt: str, negative_prompt: str, timer: StageTimer | None = None) -> TextFeatures:
        """CLAP features of the prompt pair, tokenized together as the official code does."""
        timer = timer or StageTimer(self.device)
        with timer.stage("clap"), self._on_device(self.components.clap), encoder_autocast(self.device, self._encoder_dtype()):
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
        """Latents [len(seeds), 128, La] for one feature set; each row has its own seeded noise.
        A student engine samples with its own step count and no CFG, whatever is asked."""
        if self.student_recipe is not None:
            steps, guidance = self.student_recipe.steps, 1.0  # type: ignore[attr-defined]
        noise = torch.cat([initial_noise(1, visual.latent_length, seed=s) for s in seeds]).to(self.device)
        cb = (lambda i, n, _x: progress("denoise", i, n)) if progress else None
        n_text = text.text.shape[1]
        text_feat, uncond, lengths = text.text, text.uncond, None
        if self.step_graphs is not None and n_text < TEXT_BUCKET:
            text_feat, uncond = _pad_tokens(text_feat, TEXT_BUCKET), _pad_tokens(uncond, TEXT_BUCKET)
            lengths = [n_text] * len(seeds)
        with self._on_device(self.components.dit):
            return sample_latents(
                self.components.dit,
                noise=noise,
                clip_feat=visual.siglip,
                sync_feat=visual.sync,
                text_feat=text_feat,
                uncond_text_feat=uncond,
                steps=steps,
                guidance_scale=guidance,
                shift=self._sampling_shift(),
                callback=cb,
                text_lengths=lengths,
                runner=self.step_graphs,
            )

    def _sampling_shift(self) -> float:
        # A student samples on the grid it was trained for; the official schedule is unshifted.
        return float(getattr(self.student_recipe, "shift", 1.0)) if self.student_recipe is not None else 1.0

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 1, 960*La] float32 waveforms at 48 kHz (the DAC runs in fp32)."""
        with self._on_device(self.components.dac):
            return self.components.dac.decode(latents.to(self.device, torch.float32)).float().cpu()

    # -- the public entry points ---------------------------------------------------------------

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None) -> GenerationResult:
        """Run one request end to end and write its output file, if it names one.

        ``progress(stage, done, total)`` is called as the long stages advance. Raises
        :class:`~foleyserve.pipeline.requests.RequestError` for a bad request,
        :class:`~foleyserve.media.MediaError` for an unusable video, and
        :class:`~foleyserve.models.encoders.PromptTooLongError` for a prompt CLAP cannot encode.
        A video (or ``start``/``duration`` range) over 15 s runs in windows: ``longform.generate``.
        """
        plan = longform.plan_for(request)
        if plan is not None:
            return longform.generate(self, request, progress, plan=plan)
        job = self.prepare(request, progress=progress)
        latents = self.sample_jobs([job], progress=progress)[0]
        return self.finish(job, latents)

    def prepare(
        self,
        request: GenerationRequest,
        *,
        decoded: media.DecodedVideo | None = None,
        visual: VisualFeatures | None = None,
        text: TextFeatures | None = None,
        progress: ProgressFn | None = None,
    ) -> PreparedJob:
        """Validate a request and run its encoders. Callers with cached features pass them in
        (``decoded`` is still needed for the result's duration and muxing; it is decoded if absent)."""
        request.validate()
        if self.student_recipe is not None:
            from foleyserve.distill.student import with_recipe

            request = with_recipe(request, self.student_recipe)  # type: ignore[arg-type]
        timer = StageTimer(self.device)
        if decoded is None:
            decoded = self.decode(request.video, timer, progress, max_seconds=request.duration or MAX_SECONDS)
        if visual is None:
            visual = self.encode_visual(decoded, timer, progress)
        else:  # cached features come back on the host
            visual = VisualFeatures(
                siglip=visual.siglip.to(self.device), sync=visual.sync.to(self.device), frames_25fps=visual.frames_25fps
            )
        if text is None:
            text = self.extract_text(request.prompt, request.negative_prompt, timer)
        else:
            text = TextFeatures(text=text.text.to(self.device), uncond=text.uncond.to(self.device))
        return PreparedJob(request=request, visual=visual, text=text, decoded=decoded, timer=timer)

    def sample_jobs(
        self,
        jobs: list[PreparedJob],
        *,
        progress: ProgressFn | None = None,
        keep_rows: Callable[[], "list[bool] | None"] | None = None,
    ) -> list[torch.Tensor]:
        """One batched denoising loop for jobs with equal :meth:`PreparedJob.batch_key`.

        Each job keeps its own seed, guidance scale, prompts and visual features; prompts of
        different lengths are padded and masked. Returns one ``[1, 128, La]`` latent per job (rows
        that ``keep_rows`` dropped come back unfinished). The DiT time is added to every job's timer.
        """
        if not jobs:
            return []
        keys = {job.batch_key() for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs with different batch keys (latent length, steps, guided) cannot share a loop: {sorted(keys)}")
        first = jobs[0]
        n_text = max(job.text.text.shape[1] for job in jobs)
        if self.step_graphs is not None:
            n_text = max(n_text, TEXT_BUCKET)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return _pad_tokens(t, n_text)

        noise = torch.cat([initial_noise(1, first.latent_length, seed=job.request.seed) for job in jobs]).to(self.device)
        cache = StepCache(self.step_cache) if self.step_cache is not None else None
        cb = (lambda i, n, _x: progress("denoise", i, n)) if progress else None
        timer = StageTimer(self.device)
        with timer.stage("dit"), self._on_device(self.components.dit):
            latents = sample_latents(
                self.components.dit,
                noise=noise,
                clip_feat=torch.cat([job.visual.siglip for job in jobs]),
                sync_feat=torch.cat([job.visual.sync for job in jobs]),
                text_feat=torch.cat([pad(job.text.text) for job in jobs]),
                uncond_text_feat=torch.cat([pad(job.text.uncond) for job in jobs]),
                steps=first.request.steps,
                guidance_scale=[float(job.request.guidance) for job in jobs],
                shift=self._sampling_shift(),
                text_lengths=[job.text.text.shape[1] for job in jobs],
                step_cache=cache,
                keep_rows=keep_rows,
                callback=cb,
                runner=self.step_graphs,
            )
        self.last_step_cache_report = cache.report() if cache is not None else None
        bad = [i for i in range(len(jobs)) if not bool(torch.isfinite(latents[i]).all())]
        if bad and (keep_rows is None or any((keep_rows() or [True] * len(jobs))[i] for i in bad)):
            # fp16's range is the usual culprit: activations past 65504 become inf, then NaN.
            raise RuntimeError(
                f"the denoiser produced non-finite values at precision {self.precision}"
                + ("; fp16 overflows on some inputs: use bf16" if self.precision == "fp16" else "")
            )
        for job in jobs:
            job.timer.records["dit"] = timer.records["dit"]
        return [latents[i : i + 1] for i in range(len(jobs))]

    def finish(self, job: PreparedJob, latents: torch.Tensor) -> GenerationResult:
        """DAC decode one job's latents and write its outputs."""
        with job.timer.stage("dac"):
            audio = self.decode_audio(latents)[0]
        return self.write_result(job.request, audio, job.decoded, job.timer)

    def generate_batch(
        self,
        requests: Iterable[GenerationRequest],
        progress: ProgressFn | None = None,
        *,
        max_batch_size: int = 1,
    ) -> list[GenerationResult | Exception]:
        """Run several requests, batching the denoiser over jobs that can share a loop (up to
        ``max_batch_size`` at once). A failing request yields its exception; the others complete."""
        requests = list(requests)
        results: list[GenerationResult | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, PreparedJob]]] = {}
        for i, req in enumerate(requests):
            try:
                plan = longform.plan_for(req)
                if plan is not None:  # a long video's windows batch among themselves
                    results[i] = longform.generate(self, req, progress, plan=plan)
                    continue
                job = self.prepare(req, progress=progress)
            except (ValueError, RuntimeError, OSError) as e:  # RequestError, MediaError; a window loop's failure
                results[i] = e
                continue
            groups.setdefault(job.batch_key(), []).append((i, job))
        for members in groups.values():
            for start in range(0, len(members), max(1, max_batch_size)):
                chunk = members[start : start + max(1, max_batch_size)]
                try:
                    latents = self.sample_jobs([job for _, job in chunk], progress=progress)
                except (RequestError, ValueError, RuntimeError) as e:
                    log.exception("a batch of %d failed in the denoiser", len(chunk))
                    for i, _ in chunk:
                        results[i] = e
                    continue
                for (i, job), lat in zip(chunk, latents):
                    try:
                        results[i] = self.finish(job, lat)
                    except (RequestError, media.MediaError, OSError) as e:
                        results[i] = e
        return results  # type: ignore[return-value]

    # -- helpers -------------------------------------------------------------------------------

    def write_result(
        self,
        request: GenerationRequest,
        audio: torch.Tensor,
        decoded: media.DecodedVideo,
        timer: StageTimer | None = None,
    ) -> GenerationResult:
        """Write ``audio`` ([1, T] at 48 kHz) as the request asks (at its loudness) and describe it.
        Also used for a result served from a cache: no model runs here."""
        timer = timer or StageTimer(self.device)
        warnings: list[str] = []
        if self.components.is_demo:
            warnings.append("demo model: random weights, the audio is noise (use --model-dir for the real model)")
        covered = audio.shape[-1] / self.sample_rate
        if decoded.duration > max(MAX_SECONDS, covered) + 0.05:  # a single clip cut at 15 s (duration <= 15)
            warnings.append(
                f"the video is {decoded.duration:.2f} s long but one clip covers at most {MAX_SECONDS + 0.04:.2f} s: "
                f"the audio covers 0-{covered:.2f} s and the rest of the video is silent (leave duration unset "
                f"for full-length audio)"
            )
        elif decoded.duration > covered + 0.05:
            # A short gap is the official frame/latent rounding; a longer one, a trimmed decode.
            why = " (the model's frame and latent rounding)" if decoded.duration - covered < 0.2 else ""
            warnings.append(
                f"the audio covers 0-{covered:.2f} s of the {decoded.duration:.2f} s video; the last "
                f"{decoded.duration - covered:.2f} s are silent{why}"
            )
        files: list[Path] = []
        # Loudness is timed with the write; with nothing to write, as its own stage.
        with timer.stage("write" if request.output is not None else "loudness"):
            mastered = master(request, audio, self.sample_rate)  # `audio` itself stays raw
            if request.output is not None:
                out = Path(request.output)
                if out.suffix.lower() == ".mp4":
                    source = request.video if isinstance(request.video, (bytes, bytearray)) else Path(request.video)
                    media.mux(source, mastered.waveform, self.sample_rate, out,
                              keep_original_audio_gain=request.keep_original_audio_gain, mix=mastered.mix)
                else:
                    media.write_audio(out, mastered.waveform, self.sample_rate, bits=request.bit_depth)
                files.append(out)
        warnings.extend(mastered.notes)
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
            output_waveform=mastered.waveform,
            loudness=mastered.report,
        )
