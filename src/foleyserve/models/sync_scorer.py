"""Synchformer's audio branch and sync head: the audio-visual offset classifier behind DeSync.

The released ``synchformer_state_dict.pth`` is a whole Synchformer. The Foley pipeline runs only
its visual branch (:mod:`foleyserve.models.synchformer`); scoring a result also needs the rest:

* the 16 kHz front end: 0.64 s segments (10240 samples) every 0.32 s, each a 128-bin HTK log-mel
  spectrogram (n_fft 1024, 25 ms Hann window, 10 ms hop; 65 frames padded to 66 with zeros in the
  log domain), normalised with AudioSet statistics as ``(x - mean) / (2 * std)``;
* the AST audio branch (``afeat_extractor.*``): a ViT over 16x16 patches with stride 10 (12 x 6
  patches), then per time column a transformer layer with its own CLS token pools the 12
  frequency patches -> 6 tokens per segment;
* the sync head (``vproj``, ``aproj``, ``transformer.*``): 14 segments of each stream (8 visual
  and 6 audio tokens per segment, 4.8 s) with an offset token and a modality token, 198 positions,
  three pre-norm blocks; the offset token's logits over 21 offsets from -2 s to +2 s.

:class:`SyncScorer` holds exactly the non-visual keys of the checkpoint, with the official names,
so the file loads with ``strict=True`` into the visual model and this one together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from foleyserve.models.synchformer import SpatialAggregation

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = 10240  # 0.64 s: the audio of one 16-frame video segment at 25 fps
SEGMENT_HOP = 5120  # half a segment, as the video segments' stride of 8 frames
N_FFT = 1024
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 128
MEL_FRAMES = 66  # the AST's time length: 65 STFT frames of a segment plus one padded
AST_MEAN = -4.2677393  # AudioSet log-mel statistics the AST was pre-trained with
AST_STD = 4.5689974
LOG_EPS = 1e-6
WINDOW_SEGMENTS = 14  # segments per sync-head call (4.8 s); fixed by its 198 position embeddings
MAX_OFFSET_SEC = 2.0
OFFSET_CLASSES = 21


@dataclass(frozen=True)
class SyncScorerConfig:
    """Widths of the audio branch and the head; the defaults are the released checkpoint's."""

    hidden_size: int = 768  # AST width (= the visual width: vproj/aproj are square)
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    head_layers: int = 3
    head_heads: int = 8
    segments: int = WINDOW_SEGMENTS
    classes: int = OFFSET_CLASSES


def tiny_sync_scorer_config(hidden_size: int = 64) -> SyncScorerConfig:
    """The shape the conformance fixtures use (2 AST layers, 2 heads, 2 head blocks)."""
    return SyncScorerConfig(hidden_size=hidden_size, num_layers=2, num_heads=2, intermediate_size=2 * hidden_size, head_layers=2, head_heads=2)


def offset_grid(classes: int = OFFSET_CLASSES, max_offset: float = MAX_OFFSET_SEC) -> torch.Tensor:
    """Offset (seconds) of each class: float32 of numpy's float64 linspace, as the official grid."""
    return torch.from_numpy(np.linspace(-max_offset, max_offset, classes)).float()


# ------------------------------------------------------------------------------- front end


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int, *, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited (Hann-windowed sinc) resampling along the last axis.

    The same filter and output length as ``torchaudio.functional.resample`` with its defaults,
    kernel computed in the waveform's dtype as there, so 48 kHz Foley scores as torchaudio
    would have resampled it; torchaudio itself is not a dependency.
    """
    if orig_freq == new_freq:
        return waveform
    if not waveform.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {waveform.dtype}")
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    dtype, device = waveform.dtype, waveform.device
    taps = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + taps
    t = (t * base).clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones((), dtype=dtype, device=device), t.sin() / t)
    kernel = kernel * (window * (base / orig))
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    length = flat.shape[-1]
    out = F.conv1d(F.pad(flat, (width, width + orig))[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * length / orig)]
    return out.reshape(*shape[:-1], out.shape[-1])


def _htk_mel_filters(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """[n_freqs, n_mels] triangular HTK-mel filters, unnormalised, 0 Hz to Nyquist (float32)."""
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    top = 2595.0 * math.log10(1.0 + float(sample_rate // 2) / 700.0)
    mels = torch.linspace(0.0, top, n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    slopes = edges.unsqueeze(0) - freqs.unsqueeze(1)
    rising = (-1.0 * slopes[:, :-2]) / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.min(rising, falling), min=0.0)


class SyncMelFrontEnd(nn.Module):
    """16 kHz waveform -> normalised log-mel segments [B, S, 128, 66], the AST's input.

    The window and filters are buffers outside the state dict (the checkpoint has none).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN_LENGTH), persistent=False)
        self.register_buffer("mel_filters", _htk_mel_filters(N_FFT // 2 + 1, N_MELS, SAMPLE_RATE), persistent=False)

    @staticmethod
    def num_segments(samples: int) -> int:
        """How many 0.64 s segments fit (0 when fewer than 10240 samples)."""
        return max(0, (samples - SEGMENT_SAMPLES) // SEGMENT_HOP + 1)

    def mel(self, segments: torch.Tensor) -> torch.Tensor:
        """Power mel spectrogram of the last axis: [..., n] -> [..., 128, frames]."""
        flat = segments.reshape(-1, segments.shape[-1])
        spec = torch.stft(
            flat, N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=self.window.to(flat.dtype),
            center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        ).abs().pow(2.0)
        mel = torch.matmul(spec.transpose(-1, -2), self.mel_filters.to(spec.dtype)).transpose(-1, -2)
        return mel.reshape(*segments.shape[:-1], *mel.shape[-2:])

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, n] at 16 kHz -> [B, S, 128, 66]."""
        if waveform.ndim != 2:
            raise ValueError(f"expected a waveform [B, samples], got shape {tuple(waveform.shape)}")
        if self.num_segments(waveform.shape[-1]) < 1:
            raise ValueError(f"need at least {SEGMENT_SAMPLES} samples at {SAMPLE_RATE} Hz (0.64 s), got {waveform.shape[-1]}")
        segments = waveform.unfold(-1, SEGMENT_SAMPLES, SEGMENT_HOP)  # [B, S, 10240]
        x = torch.log(self.mel(segments) + LOG_EPS)
        # Pad (or cut) in the log domain, before normalising: the padded column is 0 there.
        short = MEL_FRAMES - x.shape[-1]
        x = F.pad(x, (0, short)) if short > 0 else x[..., :MEL_FRAMES]
        return (x - AST_MEAN) / (2 * AST_STD)


# ------------------------------------------------------------------------------- AST branch


class _Dense(nn.Module):
    """Holder giving a linear layer the official ``<name>.dense`` key."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _ASTSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class _ASTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _ASTSelfAttention(dim, heads)
        self.output = _Dense(dim, dim)


class ASTLayer(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-12, exact GELU), with the Hugging Face AST key names."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attention = _ASTAttention(dim, heads)
        self.intermediate = _Dense(dim, ff)
        self.output = _Dense(ff, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _PatchEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(1, dim, kernel_size=16, stride=10)


class ASTEmbeddings(nn.Module):
    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embeddings = _PatchEmbeddings(dim)
        self.position_embeddings = nn.Parameter(torch.zeros(1, tokens + 2, dim))


class _Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class AST(nn.Module):
    """The AST backbone (``afeat_extractor.ast``): [N, 128, 66] spectrograms -> [N, D, 12, 6] patches."""

    FREQ_PATCHES = (N_MELS - 16) // 10 + 1  # 12
    TIME_PATCHES = (MEL_FRAMES - 16) // 10 + 1  # 6

    def __init__(self, cfg: SyncScorerConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.embeddings = ASTEmbeddings(d, self.FREQ_PATCHES * self.TIME_PATCHES)
        self.encoder = _Encoder([ASTLayer(d, cfg.num_heads, cfg.intermediate_size) for _ in range(cfg.num_layers)])
        self.layernorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        n = spec.shape[0]
        emb = self.embeddings
        # Frequency is the conv's height: patches come out frequency-major (index f * 6 + t).
        patches = emb.patch_embeddings.projection(spec.unsqueeze(1))  # [N, D, 12, 6]
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat((emb.cls_token.expand(n, -1, -1), emb.distillation_token.expand(n, -1, -1), x), dim=1)
        x = x + emb.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        x = self.layernorm(x)[:, 2:]  # the CLS and distillation outputs are not used for sync
        return x.transpose(1, 2).reshape(n, -1, self.FREQ_PATCHES, self.TIME_PATCHES)


class AudioBranch(nn.Module):
    """``afeat_extractor``: [B, S, 128, 66] -> [B, S, 6, D] (one token per 0.107 s time column)."""

    def __init__(self, cfg: SyncScorerConfig) -> None:
        super().__init__()
        self.ast = AST(cfg)
        self.freq_attn_agg = SpatialAggregation(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        b, s = spec.shape[:2]
        x = self.ast(spec.flatten(0, 1))  # [B*S, D, 12, 6]
        n, d, f, t = x.shape
        x = x.permute(0, 3, 2, 1).reshape(n * t, f, d)  # each time column's 12 frequency patches
        return self.freq_attn_agg(x).view(b, s, t, d)


# ------------------------------------------------------------------------------- sync head


class _HeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _HeadBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _HeadAttention(dim, heads)
        # Indices 0 and 2 are the official Sequential's Linear layers (1 = GELU, 3 = dropout).
        self.mlp = nn.ModuleDict({"0": nn.Linear(dim, 4 * dim), "2": nn.Linear(4 * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp["2"](F.gelu(self.mlp["0"](self.ln2(x))))


class _PosEmb(nn.Module):
    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, positions, dim))


class OffsetHead(nn.Module):
    """``transformer``: [OFF, visual tokens, MOD, audio tokens] -> offset logits from OFF's output."""

    def __init__(self, cfg: SyncScorerConfig, visual_tokens: int = 8) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.vis_in_lnorm = nn.LayerNorm(d)
        self.aud_in_lnorm = nn.LayerNorm(d)
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, d))
        positions = 2 + cfg.segments * (visual_tokens + AST.TIME_PATCHES)
        self.pos_emb_cfg = _PosEmb(positions, d)
        self.blocks = nn.ModuleList(_HeadBlock(d, cfg.head_heads) for _ in range(cfg.head_layers))
        self.ln_f = nn.LayerNorm(d)
        self.off_head = nn.Linear(d, cfg.classes)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        b = v.shape[0]
        x = torch.cat(
            (self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(v), self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(a)), dim=1
        )
        if x.shape[1] != self.pos_emb_cfg.pos_emb.shape[1]:
            raise ValueError(f"the sync head takes exactly {self.pos_emb_cfg.pos_emb.shape[1]} tokens, got {x.shape[1]}")
        x = x + self.pos_emb_cfg.pos_emb
        for block in self.blocks:
            x = block(x)
        # Every op after the last attention is per token, so only the offset token is normalised.
        return self.off_head(self.ln_f(x[:, 0]))


class SyncScorer(nn.Module):
    """Everything of the released Synchformer except ``vfeat_extractor``, official key names."""

    def __init__(self, cfg: SyncScorerConfig = SyncScorerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.frontend = SyncMelFrontEnd()
        self.afeat_extractor = AudioBranch(cfg)
        self.vproj = nn.Linear(d, d)
        self.aproj = nn.Linear(d, d)
        self.transformer = OffsetHead(cfg)

    def audio_features(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        """[B, n] 16 kHz -> [B, S, 6, D] per-segment audio tokens."""
        dtype = self.vproj.weight.dtype
        spec = self.frontend(waveform_16k.float()).to(dtype)
        return self.afeat_extractor(spec)

    def offset_logits(self, vfeat: torch.Tensor, afeat: torch.Tensor) -> torch.Tensor:
        """[B, 14, 8, D] visual and [B, 14, 6, D] audio segment tokens -> [B, 21] logits."""
        b = vfeat.shape[0]
        v = self.vproj(vfeat.to(self.vproj.weight.dtype)).reshape(b, -1, vfeat.shape[-1])
        a = self.aproj(afeat.to(self.aproj.weight.dtype)).reshape(b, -1, afeat.shape[-1])
        return self.transformer(v, a)


# ------------------------------------------------------------------------------- build / load

_VISUAL_PREFIX = "vfeat_extractor."


def build_sync_scorer(config: SyncScorerConfig | None = None, *, seed: int | None = None) -> SyncScorer:
    """A scorer of ``config`` (the released shape by default), random-initialised, in eval mode."""
    if seed is None:
        return SyncScorer(config or SyncScorerConfig()).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SyncScorer(config or SyncScorerConfig()).eval()


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> SyncScorerConfig:
    """Read the widths off a Synchformer state dict (head counts are not stored: the released ones
    are kept unless the width cannot hold them, as in the tiny test shape)."""
    d = sd["aproj.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("afeat_extractor.ast.encoder.layer."))
    head_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.blocks."))
    ff = sd["afeat_extractor.ast.encoder.layer.0.intermediate.dense.weight"].shape[0]
    default = SyncScorerConfig()
    released = d == default.hidden_size
    return SyncScorerConfig(
        hidden_size=d, num_layers=layers, num_heads=default.num_heads if released else 2, intermediate_size=ff,
        head_layers=head_layers, head_heads=default.head_heads if released else 2,
        segments=default.segments, classes=sd["transformer.off_head.weight"].shape[0],
    )


def scorer_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-visual entries of a full Synchformer state dict (what :class:`SyncScorer` holds)."""
    return {k: v for k, v in sd.items() if not k.startswith(_VISUAL_PREFIX)}


def load_sync_scorer(
    path_or_state_dict: Any,
    *,
    config: SyncScorerConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SyncScorer:
    """The audio branch and sync head from ``synchformer_state_dict.pth`` (or a state dict), strict.

    Every non-``vfeat_extractor.`` key must match a parameter and every parameter must be filled
    (:class:`~foleyserve.models.loading.CheckpointMismatchError` otherwise); with a safetensors
    file the visual tensors are never read.
    """
    from foleyserve.models.loading import load_into, read_state_dict

    if isinstance(path_or_state_dict, Mapping):
        sd, source = scorer_state_dict(path_or_state_dict), "state dict"
    else:
        sd = read_state_dict(path_or_state_dict, key_filter=lambda k: not k.startswith(_VISUAL_PREFIX))
        source = str(path_or_state_dict)
    model = SyncScorer(config or config_from_state_dict(sd))
    load_into(model, sd, strict=True, dtype=dtype, device=device, source=source)
    return model.to(device).eval()


def config_dict(config: SyncScorerConfig) -> dict:
    """JSON-able form (for checkpoint metadata)."""
    return asdict(config)
