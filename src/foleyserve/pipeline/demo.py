"""The demo model: every network of the real pipeline at toy width, with seeded random weights.

It exercises the whole path (decode, both visual encoders, CLAP with a real byte-level BPE
tokenizer, the MMDiT sampler, the DAC decoder, muxing) in seconds on any CPU and downloads
nothing. Its audio is noise; every result it produces says so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer

from foleyserve.config import DEMO_PROMPT, DEMO_STEPS  # noqa: F401 (re-exported: the demo's defaults)
from foleyserve.models.dit import build_dit, tiny_config
from foleyserve.models.encoders import build_clap_text, build_siglip_vision
from foleyserve.models.synchformer import build_synchformer_visual
from foleyserve.models.vae import build_dac
from foleyserve.pipeline.components import Components

FEATURE_DIM = 32  # width of the toy encoders, and so of the DiT's conditioning inputs
DEMO_CLAP_POSITIONS = 130  # the toy CLAP's position table: prompts of up to 128 tokens
# The toy decoder's last conv (before its tanh) is scaled by this: at unit scale the tanh saturates
# and the demo wrote full-scale clipped noise (RMS 0.8, a fifth of the samples at +-1). Measured on
# the sample clip at 25 steps, 0.035 gives about -23 dBFS RMS and peaks near -8 dBFS, with the tanh
# in its linear range. A fixed weight scale, not a per-output normalisation, so every comparison
# between demo runs (precisions, offload, step cache) stays exact; real weights are never touched.
DEMO_OUTPUT_GAIN = 0.035

DEMO_DAC = {
    "encoder_dim": 4,
    "encoder_rates": [2, 3, 4, 5, 8],
    "latent_dim": 128,
    "decoder_dim": 32,
    "decoder_rates": [8, 5, 4, 3, 2],
    "sample_rate": 48000,
    "continuous": True,
}

_CORPUS = [
    "footsteps on gravel", "rain on a tin roof", "a ball bouncing on a wooden floor", "glass breaking",
    "a door creaks open", "birds chirping in the forest", "a car engine starts", "waves crashing on rocks",
    "noisy, harsh", "wind howling", "a dog barks twice", "typing on a keyboard", "crowd cheering loudly",
]


def demo_dit_config() -> dict:
    return {**tiny_config(), "hidden_size": 64, "num_heads": 2, "clip_dim": FEATURE_DIM, "sync_feat_dim": FEATURE_DIM, "condition_dim": FEATURE_DIM}


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Seeded weights that keep activations O(1): the scheme the conformance fixtures use."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if leaf in ("weight_g", "alpha") or (leaf == "weight" and p.ndim == 1):
                p.copy_(1 + 0.1 * noise)
            elif leaf == "bias":
                p.copy_(0.05 * noise)
            elif p.ndim >= 2 and leaf in ("weight", "weight_v"):
                p.copy_(noise / (p[0].numel() ** 0.5))
            else:
                p.copy_(0.5 * noise)
    return module


def demo_tokenizer():
    """A small RoBERTa-style byte-level BPE, trained deterministically on a fixed corpus."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS * 4, vocab_size=400, min_frequency=1, show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "RobertaTokenizer", "model_max_length": 128})
        )
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def demo_components(device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokenizer = demo_tokenizer()
    dit = build_dit(demo_dit_config(), seed=seed)
    # Built whole and seeded as always (the generator's draws, and so every demo weight, stay
    # the same), then the encoder is dropped: the pipeline only decodes.
    dac = randomize_(build_dac(DEMO_DAC), gen).drop_encoder()
    # Residual units' last convs scaled down so the toy decoder does not saturate its tanh.
    with torch.no_grad():
        for name, p in dac.named_parameters():
            if name.endswith("block.3.weight_g"):
                p.mul_(0.25)
        last_conv = dac.decoder.model[-2]
        last_conv.weight_g.mul_(DEMO_OUTPUT_GAIN)
        last_conv.bias.mul_(DEMO_OUTPUT_GAIN)
    synch = randomize_(build_synchformer_visual(embed_dim=FEATURE_DIM, num_heads=2, depth=1), gen)
    tiny = dict(hidden_size=FEATURE_DIM, intermediate_size=2 * FEATURE_DIM, num_hidden_layers=1, num_attention_heads=2)
    siglip = build_siglip_vision(seed=seed, **tiny)
    clap = build_clap_text(seed=seed + 1, vocab_size=len(tokenizer), max_position_embeddings=DEMO_CLAP_POSITIONS, **tiny)
    return Components(
        dit=dit.to(device).eval(),
        dac=dac.to(device).eval(),
        synchformer=synch.to(device).eval(),
        siglip=siglip.to(device),
        clap=clap.to(device),
        tokenizer=tokenizer,
        name="demo (random weights)",
        device=device,
        is_demo=True,
    )


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def demo_precision(device: str | torch.device = "cpu", *, cpu_flags: set[str] | None = None) -> tuple[str, str]:
    """The precision the demo model runs in on ``device``, and why (for the run's output).

    bf16 where the hardware multiplies bf16 matrices natively (AMX or AVX512-BF16 on a CPU, a
    GPU with bf16 support); elsewhere fp32, because emulated bf16 is slower than fp32 and the demo
    is there to be quick. The CLI's ``demo``, ``generate --demo``, ``batch --demo``,
    :func:`foleyserve.generate` and the server's ``--demo`` all ask this function.
    ``device`` "auto" means the CPU, as for the demo engine. ``cpu_flags`` replaces /proc/cpuinfo's (tests).
    """
    # "auto" is the CPU for the demo (Engine.from_config's rule: the toy model gains nothing from a GPU).
    dev = torch.device("cpu" if str(device) == "auto" else device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(dev)} supports bf16"
        return "fp32", "this GPU has no bf16 support"
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    if flags is None:
        return "fp32", "cannot read this CPU's flags to tell whether it has bf16 matrix units"
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return "bf16", f"this CPU has {flag}"
    return "fp32", "this CPU has no bf16 matrix units (no amx_bf16 or avx512_bf16)"


def sample_clip_path() -> Path:
    """The bundled synthetic sample clip (made by scripts/make_sample_clip.py)."""
    from importlib.resources import files

    return Path(str(files("foleyserve") / "assets" / "sample.mp4"))


def demo_scorers(components: Components | None = None, *, device: torch.device | str = "cpu", seed: int = 0):
    """Tiny random-weight scorers (DeSync + CLAP) matching the demo model; their scores are noise.

    ``components`` (the demo engine's) shares its Synchformer visual branch and CLAP text tower;
    without it they are built as :func:`demo_components` builds them.
    """
    from foleyserve.models.clap_audio import build_clap_audio, clap_feature_extractor, tiny_clap_audio_config
    from foleyserve.models.sync_scorer import build_sync_scorer, tiny_sync_scorer_config
    from foleyserve.scoring import Scorers

    dev = torch.device(device)
    comps = components
    # Scoring runs the torch towers; an engine whose stages run exported graphs (foleyserve.export)
    # no longer holds them, so they are rebuilt as demo_components makes them.
    if comps is None or not all(isinstance(m, torch.nn.Module) for m in (comps.synchformer, comps.clap)):
        comps = demo_components(dev, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    scorer = randomize_(build_sync_scorer(tiny_sync_scorer_config(FEATURE_DIM)), gen).to(dev).eval()
    projection = int(comps.clap.config.projection_dim)
    clap_audio = build_clap_audio(tiny_clap_audio_config(projection), seed=seed + 3, device=dev)
    return Scorers(
        sync_visual=comps.synchformer, sync_scorer=scorer, clap_text=comps.clap, tokenizer=comps.tokenizer,
        clap_audio=clap_audio, clap_features=clap_feature_extractor(None), device=dev, is_demo=True,
    )
