"""The HunyuanVideo-Foley MMDiT denoiser, state-dict compatible with the official checkpoints.

Structure (official names): text/visual/sync/time embedders -> ``triple_blocks`` (audio and visual
streams with joint self-attention, cross-attention to text, per-stream MLPs) -> ``single_blocks``
(audio only, per-token modulation, k=3 conv projections) -> ``final_layer``.

The forward pass is split the way a sampler wants it: :meth:`FoleyDiT.prepare_conditions` does the
work that does not depend on the step (text, visual and sync embeddings, every block's text K/V,
RoPE tables) once per request, and :meth:`FoleyDiT.predict_flow` runs per step. ``forward`` composes
the two and reproduces the official ``forward(...)["x"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from foleyserve.models.layers import (
    MLP,
    ConditionProjection,
    ConvMLP,
    FinalLayer,
    Modulation,
    PatchEmbed1D,
    QKNorm,
    SwiGLU,
    TimestepEmbedder,
    TapLinear,
    TokenConv1d,
    ln_modulate,
    nearest_exact_index,
    rms_rope,
    rope_operands,
)
# The configuration lives in its own module; re-exported here, where callers import it from.
from foleyserve.models.dit_config import DiTConfig, tiny_config, xl_config, xxl_config  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Step-invariant conditioning
# ---------------------------------------------------------------------------------------------


@dataclass
class DiTConditions:
    """Everything a denoising step needs that does not depend on the step.

    Tensors have the batch layout of the model call (for CFG: unconditional rows first). RoPE
    operands are ``(cos, signed sin)`` pairs from :func:`~foleyserve.models.layers.rope_operands`,
    already on the device, so a step makes no host-to-device copies.
    """

    visual: torch.Tensor  # [B, Lv, d] visual_proj(clip_feat), the visual stream's input
    add_sync: torch.Tensor  # [B, La, d] sync_in(sync_feat) stretched to the latent length
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per triple block: K (normed, rotated), V [B, Lt, H, Dh]
    rope_audio_self: tuple[torch.Tensor, torch.Tensor]  # audio rows of the interleaved table (positions 2i)
    rope_visual_self: tuple[torch.Tensor, torch.Tensor]  # visual rows (positions 2*m(j)+1)
    visual_gather: torch.Tensor | None  # [Lv] visual token landing in each row after the round trip; None = identity
    rope_audio: tuple[torch.Tensor, torch.Tensor]  # positions 0..La-1 (cross-attention and single blocks)
    rope_visual: tuple[torch.Tensor, torch.Tensor]  # positions 0..Lv-1 (cross-attention)
    # The single blocks' per-token modulation input is sync_in(sync) stretched to La by nearest-exact.
    # A per-token map commutes with that gather, so the modulation runs on the Ls distinct sync rows
    # and is gathered afterwards (Ls is about half of La).
    sync_tokens: torch.Tensor | None = None  # [B, Ls, d] sync_in(sync_feat) before stretching
    sync_index: torch.Tensor | None = None  # [La] sync token feeding each audio row
    # Rows batched from requests with different prompt lengths pad the text; True = a real token.
    # None when every row has the full length (the official, mask-free case).
    text_mask: torch.Tensor | None = None  # [B, 1, 1, Lt] bool

    @property
    def audio_len(self) -> int:
        return self.add_sync.shape[1]

    @property
    def batch_size(self) -> int:
        return self.add_sync.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "DiTConditions":
        """The conditions of a subset of batch rows (``rows``: long indices)."""
        index = torch.as_tensor(rows, dtype=torch.long).to(self.add_sync.device)
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return replace(
            self,
            visual=pick(self.visual),
            add_sync=pick(self.add_sync),
            text_kv=[(pick(k), pick(v)) for k, v in self.text_kv],
            sync_tokens=pick(self.sync_tokens),
            text_mask=pick(self.text_mask),
        )

    def structure(self) -> tuple[int, bool, bool, bool, bool]:
        """The number of triple blocks and which optional tensors exist: what, with
        :meth:`tensors`, rebuilds the conditions (:meth:`from_tensors`), and part of a compiled
        step's bucket. Plain values only, so a compiled function can close over it."""
        optional = (self.visual_gather, self.sync_tokens, self.sync_index, self.text_mask)
        return (len(self.text_kv), *(t is not None for t in optional))  # type: ignore[return-value]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order: what a compiled step takes as inputs and a captured
        graph keeps static copies of (the per-length tables too, so a new request's equal tables
        are copied rather than baked in)."""
        out = [self.visual, self.add_sync]
        for k, v in self.text_kv:
            out += [k, v]
        for table in (self.rope_audio_self, self.rope_visual_self, self.rope_audio, self.rope_visual):
            out += list(table)
        out += [t for t in (self.visual_gather, self.sync_tokens, self.sync_index, self.text_mask) if t is not None]
        return out

    @classmethod
    def from_tensors(cls, structure: tuple[int, bool, bool, bool, bool], tensors: list[torch.Tensor]) -> "DiTConditions":
        """The inverse of :meth:`tensors` for a :meth:`structure`."""
        n_blocks, *present = structure
        it = iter(tensors)
        visual, add_sync = next(it), next(it)
        text_kv = [(next(it), next(it)) for _ in range(n_blocks)]
        tables = [(next(it), next(it)) for _ in range(4)]
        opt = [next(it) if p else None for p in present]
        return cls(
            visual=visual, add_sync=add_sync, text_kv=text_kv,
            rope_audio_self=tables[0], rope_visual_self=tables[1], rope_audio=tables[2], rope_visual=tables[3],
            visual_gather=opt[0], sync_tokens=opt[1], sync_index=opt[2], text_mask=opt[3],
        )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over token-major ``[B, L, H, Dh]`` tensors, returning ``[B, Lq, H*Dh]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    b, _, lq, _ = out.shape
    return out.transpose(1, 2).reshape(b, lq, -1)


def _act_dtype(layer: nn.Module) -> torch.dtype:
    """The input dtype a projection computes in: its weights' (bf16 under the bf16 policy), or
    the output dtype of a float8 layer, which quantises from it."""
    out = getattr(layer, "out_dtype", None)
    if out is not None:
        return out
    for p in layer.parameters():
        return p.dtype
    return torch.float32


class StepCacheLike(Protocol):
    """What :meth:`FoleyDiT.predict_flow` asks of a step cache (see ``pipeline/stepcache.py``)."""

    residual: torch.Tensor | None

    def rows_to_compute(self, first_block_out: torch.Tensor) -> list[int] | None: ...

    def store(self, first_block_out: torch.Tensor, hidden: torch.Tensor) -> None: ...


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
#
# Modulation tensors are ``[B, 1 or L, factor, d]`` with chunks (shift, 1 + scale, gate) per use;
# LayerNorm + modulate is float32 on every device (``ln_modulate``); QK-norm and RoPE are one fused
# float32 function (``rms_rope``); gated residuals are one ``addcmul``. Together they cut the eager
# op count per step by about half, and they are what Inductor fuses into single kernels.


class TripleStreamBlock(nn.Module):
    """Audio and visual streams: joint self-attention, cross-attention to text, per-stream MLPs."""

    # Methods other than forward that callers run directly (the offload streamer wraps them too).
    offload_entry_points = ("text_kv",)

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        d, hd = hidden_size, hidden_size // num_heads
        self.num_heads = num_heads
        self.audio_mod = Modulation(d, 9)
        self.audio_self_attn_qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.audio_self_q_norm = QKNorm(hd)
        self.audio_self_k_norm = QKNorm(hd)
        self.audio_self_proj = nn.Linear(d, d, bias=qkv_bias)
        self.v_cond_mod = Modulation(d, 9)
        self.v_cond_attn_qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.v_cond_attn_q_norm = QKNorm(hd)
        self.v_cond_attn_k_norm = QKNorm(hd)
        self.v_cond_self_proj = nn.Linear(d, d, bias=qkv_bias)
        self.audio_cross_q = nn.Linear(d, d, bias=qkv_bias)
        self.v_cond_cross_q = nn.Linear(d, d, bias=qkv_bias)
        self.text_cross_kv = nn.Linear(d, 2 * d, bias=qkv_bias)
        self.audio_cross_q_norm = QKNorm(hd)
        self.v_cond_cross_q_norm = QKNorm(hd)
        self.text_cross_k_norm = QKNorm(hd)
        self.audio_cross_proj = nn.Linear(d, d, bias=qkv_bias)
        self.v_cond_cross_proj = nn.Linear(d, d, bias=qkv_bias)
        self.audio_mlp = MLP(d, mlp_hidden)
        self.v_cond_mlp = MLP(d, mlp_hidden)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        # Official layout: the part axis (q/k/v or k/v) is outermost, then heads, then head_dim.
        b, n, _ = x.shape
        return x.view(b, n, parts, self.num_heads, -1).unbind(2)

    @staticmethod
    def _norm_rope(norm: QKNorm, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rms_rope(x, norm.weight, norm.eps, rope)

    def _qk_norm_rope(self, qkv: torch.Tensor, q_norm: QKNorm, k_norm: QKNorm, rope: tuple[torch.Tensor, torch.Tensor],
                      gather: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused qkv projection; q and k are normed and rotated in ONE pass (stacked gains)."""
        b, n, _ = qkv.shape
        parts = qkv.view(b, n, 3, self.num_heads, -1)
        qk, v = parts[:, :, :2], parts[:, :, 2]
        if gather is not None:
            qk = qk[:, gather]
        weight = torch.stack((q_norm.weight, k_norm.weight)).unsqueeze(1)  # [2, 1, Dh]
        qk = rms_rope(qk, weight, q_norm.eps, rope)
        return qk[:, :, 0], qk[:, :, 1], v

    def text_kv(self, text: torch.Tensor, rope_text: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys (RMS-normed, rotated over text positions) and values: independent of the step."""
        k, v = self._heads(self.text_cross_kv(text), 2)
        return self._norm_rope(self.text_cross_k_norm, k, rope_text), v

    def forward(
        self,
        audio: torch.Tensor,
        visual: torch.Tensor,
        vec: torch.Tensor,
        c: DiTConditions,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block. ``last``: the model discards this block's visual outputs, so they are skipped
        (attention rows are independent, so no audio number changes)."""
        am = self.audio_mod(vec).unsqueeze(1)  # [B, 1, 9, d]
        vm = self.v_cond_mod(vec).unsqueeze(1)
        n_vis = visual.shape[1]
        nr = self._norm_rope
        dt = _act_dtype(self.audio_self_attn_qkv)

        # (a) joint self-attention over [visual ; audio], interleaved RoPE: audio at positions 2i;
        # the official resize-interleave-resize round trip leaves visual token gather[j] in row j
        # with position 2*m(j)+1.
        a_q, a_k, a_v = self._qk_norm_rope(
            self.audio_self_attn_qkv(ln_modulate(audio, am[:, :, 0], am[:, :, 1], 1e-6, dt)),
            self.audio_self_q_norm, self.audio_self_k_norm, c.rope_audio_self,
        )
        v_q, v_k, v_v = self._qk_norm_rope(
            self.v_cond_attn_qkv(ln_modulate(visual, vm[:, :, 0], vm[:, :, 1], 1e-6, dt)),
            self.v_cond_attn_q_norm, self.v_cond_attn_k_norm, c.rope_visual_self, c.visual_gather,
        )
        keys, values = torch.cat((v_k, a_k), 1), torch.cat((v_v, a_v), 1)
        if last:
            audio = torch.addcmul(audio, self.audio_self_proj(_sdpa(a_q, keys, values)), am[:, :, 2])
        else:
            attn = _sdpa(torch.cat((v_q, a_q), 1), keys, values)
            audio = torch.addcmul(audio, self.audio_self_proj(attn[:, n_vis:]), am[:, :, 2])
            visual = torch.addcmul(visual, self.v_cond_self_proj(attn[:, :n_vis]), vm[:, :, 2])

        # (b) cross-attention to text; each stream rotated over its own positions
        t_k, t_v = text_kv
        a_q = self._heads(self.audio_cross_q(ln_modulate(audio, am[:, :, 3], am[:, :, 4], 1e-6, dt)), 1)[0]
        a_q = nr(self.audio_cross_q_norm, a_q, c.rope_audio)
        if last:
            audio = torch.addcmul(audio, self.audio_cross_proj(_sdpa(a_q, t_k, t_v, c.text_mask)), am[:, :, 5])
        else:
            v_q = self._heads(self.v_cond_cross_q(ln_modulate(visual, vm[:, :, 3], vm[:, :, 4], 1e-6, dt)), 1)[0]
            v_q = nr(self.v_cond_cross_q_norm, v_q, c.rope_visual)
            cross = _sdpa(torch.cat((v_q, a_q), 1), t_k, t_v, c.text_mask)
            audio = torch.addcmul(audio, self.audio_cross_proj(cross[:, n_vis:]), am[:, :, 5])
            visual = torch.addcmul(visual, self.v_cond_cross_proj(cross[:, :n_vis]), vm[:, :, 5])

        # (c) MLPs
        audio = torch.addcmul(audio, self.audio_mlp(ln_modulate(audio, am[:, :, 6], am[:, :, 7], 1e-6, dt)), am[:, :, 8])
        if not last:
            visual = torch.addcmul(visual, self.v_cond_mlp(ln_modulate(visual, vm[:, :, 6], vm[:, :, 7], 1e-6, dt)), vm[:, :, 8])
        return audio, visual


class SingleStreamBlock(nn.Module):
    """Audio-only block with per-token modulation and k=3 convolutional projections."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        d, hd = hidden_size, hidden_size // num_heads
        self.num_heads = num_heads
        self.modulation = Modulation(d, 6)
        self.linear_qkv = nn.Linear(d, 3 * d, bias=True)
        self.linear1 = TokenConv1d(d, d, kernel_size=3, padding=1, bias=True)
        self.linear2 = ConvMLP(d, mlp_hidden, kernel_size=3)
        # torch's RMSNorm with eps=None (machine epsilon of the input's dtype, fp32 compute),
        # unlike the triple blocks.
        self.q_norm = nn.RMSNorm(hd)
        self.k_norm = nn.RMSNorm(hd)

    def fuse(self, conv_layout: bool = False) -> None:
        """Inference form: the k=3 convs become tap GEMMs (w1 and w3 sharing one)."""
        if isinstance(self.linear1, TokenConv1d):
            self.linear1 = TapLinear.from_convs(self.linear1, conv_layout=conv_layout)
        self.linear2.fuse(conv_layout)

    def forward(
        self,
        x: torch.Tensor,
        mod_in: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mod_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mod_in`` is per token; with ``mod_index`` it holds distinct rows, gathered after the linear."""
        m = self.modulation(mod_in, mod_index)  # [B, La, 6, d]
        b, n, d = x.shape
        # Official layout differs from the triple blocks: (heads, head_dim, qkv) with qkv innermost.
        dt = _act_dtype(self.linear_qkv)
        qkv = self.linear_qkv(ln_modulate(x, m[:, :, 0], m[:, :, 1], 1e-5, dt)).view(b, n, self.num_heads, -1, 3)
        # q and k normed and rotated in one pass: [B, L, 2, H, Dh] with stacked gains.
        # v's head_dim has stride 3 in this layout; flash and memory-efficient attention need a
        # unit stride there (else SDPA silently takes the slow math path), so v is made contiguous.
        qk, v = qkv[..., :2].movedim(-1, 2), qkv[..., 2].contiguous()
        eps = self.q_norm.eps if self.q_norm.eps is not None else torch.finfo(qkv.dtype).eps
        qk = rms_rope(qk, torch.stack((self.q_norm.weight, self.k_norm.weight)).unsqueeze(1), eps, rope)
        x = torch.addcmul(x, self.linear1(_sdpa(qk[:, :, 0], qk[:, :, 1], v)), m[:, :, 2])
        return torch.addcmul(x, self.linear2(ln_modulate(x, m[:, :, 3], m[:, :, 4], 1e-5, _act_dtype(self.linear2))), m[:, :, 5])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class FoleyDiT(nn.Module):
    """HunyuanVideo-Foley's denoiser. Predicts flow velocity for latents ``[B, 128, La]``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.audio_embedder = PatchEmbed1D(cfg.audio_vae_latent_dim, d)
        self.visual_proj = SwiGLU(cfg.clip_dim, d, d)
        self.cond_in = ConditionProjection(cfg.condition_dim, d)
        self.time_in = TimestepEmbedder(d)
        self.sync_in = nn.Sequential(nn.Linear(cfg.sync_feat_dim, d), nn.SiLU(), ConvMLP(d, 4 * d, cfg.sync_in_ksz))
        self.sync_pos_emb = nn.Parameter(torch.zeros(1, 1, 8, cfg.sync_feat_dim))
        self.triple_blocks = nn.ModuleList(
            TripleStreamBlock(d, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias) for _ in range(cfg.depth_triple_blocks)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth_single_blocks)
        )
        self.final_layer = FinalLayer(d, cfg.audio_vae_latent_dim)
        # Learned stand-ins for "no video", used by the unconditional CFG branch.
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, cfg.clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, cfg.sync_feat_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.audio_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.audio_embedder.proj.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in: the precision policy's autocast dtype, else the weights'."""
        return getattr(self, "autocast_dtype", None) or self.dtype

    # -- conditioning -------------------------------------------------------------------------

    def empty_visual(self, batch: int, clip_len: int, sync_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional branch's visual inputs: the learned empty vectors broadcast over time."""
        return (
            self.empty_clip_feat.unsqueeze(0).expand(batch, clip_len, -1),
            self.empty_sync_feat.unsqueeze(0).expand(batch, sync_len, -1),
        )

    def sync_tokens(self, sync_feat: torch.Tensor) -> torch.Tensor:
        """Synchformer tokens -> model width (``sync_in``), before stretching to the latent length."""
        b, n, ch = sync_feat.shape
        if n % 8:
            raise ValueError(f"sync_feat has {n} tokens; Synchformer gives 8 per segment, so it must be a multiple of 8")
        x = (sync_feat.view(b, n // 8, 8, ch) + self.sync_pos_emb).view(b, n, ch)
        return self.sync_in(x)

    def embed_sync(self, sync_feat: torch.Tensor, audio_len: int) -> torch.Tensor:
        """Synchformer tokens -> model width, stretched to the latent length with nearest-exact."""
        x = self.sync_tokens(sync_feat)
        return F.interpolate(x.transpose(1, 2), size=audio_len, mode="nearest-exact").transpose(1, 2)

    def prepare_conditions(
        self,
        *,
        clip_feat: torch.Tensor,
        sync_feat: torch.Tensor,
        cond: torch.Tensor,
        audio_len: int,
        text_lengths: list[int] | None = None,
    ) -> DiTConditions:
        """Step-invariant work of one forward: embeddings, text K/V of every block, RoPE tables.

        ``text_lengths`` (one per row) marks how many leading tokens of ``cond`` are real when rows
        of different prompt lengths share a batch; padded keys are masked out of cross-attention,
        which leaves each row's numbers those of its own unpadded run.
        """
        dev = self.device
        hd = self.config.hidden_size // self.num_heads
        n_vis, n_text = clip_feat.shape[1], cond.shape[1]
        text = self.cond_in(cond)
        visual = self.visual_proj(clip_feat)
        sync_tokens = self.sync_tokens(sync_feat)
        sync_index = nearest_exact_index(sync_tokens.shape[1], audio_len).to(dev)
        add_sync = sync_tokens[:, sync_index]
        text_mask = None
        if text_lengths is not None and any(n != n_text for n in text_lengths):
            if len(text_lengths) != cond.shape[0]:
                raise ValueError(f"text_lengths has {len(text_lengths)} entries for {cond.shape[0]} rows")
            lengths = torch.tensor(text_lengths)
            text_mask = (torch.arange(n_text)[None] < lengths[:, None])[:, None, None, :].to(dev)

        up = nearest_exact_index(n_vis, audio_len)  # audio row -> visual token (visual stretched to La)
        down = nearest_exact_index(audio_len, n_vis)  # visual row -> interleaved slot it is read back from
        pos_audio = torch.arange(audio_len, dtype=torch.float32)
        rope_text = rope_operands(torch.arange(n_text, dtype=torch.float32), hd, dev)
        return DiTConditions(
            visual=visual,
            add_sync=add_sync,
            text_kv=[blk.text_kv(text, rope_text) for blk in self.triple_blocks],
            rope_audio_self=rope_operands(2 * pos_audio, hd, dev),
            rope_visual_self=rope_operands(2 * down.float() + 1, hd, dev),
            # The gather is the identity for every length pair seen so far; skip its per-step copy then.
            visual_gather=None if torch.equal(up[down], torch.arange(n_vis)) else up[down].to(dev),
            rope_audio=rope_operands(pos_audio, hd, dev),
            rope_visual=rope_operands(torch.arange(n_vis, dtype=torch.float32), hd, dev),
            sync_tokens=sync_tokens,
            sync_index=sync_index,
            text_mask=text_mask,
        )

    def fuse_for_inference(self, conv_layout: bool = False) -> "FoleyDiT":
        """Inference layout of the weights: every k=3 token conv becomes a tap GEMM, and each
        ConvMLP's w1 and w3 share one GEMM on their common input. Exact in exact arithmetic (fp32
        agrees with the checkpoint layout to ~1e-7); the state dict no longer has the checkpoint's
        conv keys, so load checkpoints before calling this (the engine does). ``conv_layout`` keeps
        the fused weights in convolution layout (see :class:`~foleyserve.models.layers.TapLinear`),
        faster on CPUs. A second call changes nothing."""
        for block in self.single_blocks:
            block.fuse(conv_layout)
        for module in self.sync_in.modules():
            if isinstance(module, ConvMLP):
                module.fuse(conv_layout)
        return self

    # -- per step -----------------------------------------------------------------------------

    def predict_flow(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        conditions: DiTConditions,
        step_cache: "StepCacheLike | None" = None,
        parts: "tuple[Any, Any, Any] | None" = None,
    ) -> torch.Tensor:
        """Velocity for latents ``x [B, C, La]`` at timesteps ``t [B]`` (0..1000 scale).

        With ``step_cache`` (see :mod:`foleyserve.pipeline.stepcache`), rows whose first-block output
        barely changed since the last computed step reuse that step's residual of the remaining
        blocks (one host sync per step, for the decision). Without it the call makes no host sync.
        ``parts`` replaces (:meth:`first_block`, :meth:`rest_blocks`, :meth:`head`), e.g. by compiled ones.
        """
        first_block, rest_blocks, head = parts or (self.first_block, self.rest_blocks, self.head)
        c = conditions
        if x.shape[-1] != c.audio_len or x.shape[0] != c.batch_size:
            raise ValueError(
                f"latents {tuple(x.shape)} do not match the prepared conditions (batch {c.batch_size}, length {c.audio_len})"
            )
        audio, visual, vec = first_block(x, t, c)
        if step_cache is None:
            return head(rest_blocks(audio, visual, vec, c))
        rows = step_cache.rows_to_compute(audio)
        if rows is None:  # every row computes: the exact uncached path
            hidden = rest_blocks(audio, visual, vec, c)
        elif len(rows) == 0:
            hidden = audio + step_cache.residual
        else:
            index = torch.tensor(rows, device=audio.device)
            part = rest_blocks(audio[index], visual[index], vec[index], c.select(index))
            hidden = audio + step_cache.residual
            hidden[index] = part
        step_cache.store(audio, hidden)
        return head(hidden)

    def first_block(self, x: torch.Tensor, t: torch.Tensor, c: DiTConditions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings and the first triple block: ``(audio, visual, vec)`` for :meth:`rest_blocks`."""
        # The time vector feeds every modulation; cast it once per step to the dtype they compute in
        # (with time_in kept in fp32 each modulation's autocast would otherwise cast it again).
        vec = self.time_in(t).to(self.compute_dtype)
        audio = self.audio_embedder(x) + c.add_sync
        n = len(self.triple_blocks)
        audio, visual = self.triple_blocks[0](audio, c.visual, vec, c, c.text_kv[0], last=n == 1)
        return audio, visual, vec

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final layer: the audio stream ``[B, La, d]`` -> velocity ``[B, C, La]``."""
        return self.final_layer(hidden).transpose(1, 2)

    def rest_blocks(self, audio: torch.Tensor, visual: torch.Tensor, vec: torch.Tensor, c: DiTConditions) -> torch.Tensor:
        """Every block after the first triple block; returns the audio stream before the final layer."""
        n = len(self.triple_blocks)
        for i in range(1, n):
            audio, visual = self.triple_blocks[i](audio, visual, vec, c, c.text_kv[i], last=i == n - 1)
        # Per-token conditioning of the single blocks: stretched sync features plus the time vector,
        # computed on the distinct sync rows and gathered inside each block.
        if c.sync_tokens is not None and c.sync_index is not None:
            mod_in, index = c.sync_tokens + vec.unsqueeze(1), c.sync_index
        else:
            mod_in, index = c.add_sync + vec.unsqueeze(1), None
        mod_in = mod_in.to(self.compute_dtype)
        for block in self.single_blocks:
            audio = block(audio, mod_in, c.rope_audio, index)
        return audio

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_feat: torch.Tensor,
        sync_feat: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """One official forward call; returns the ``"x"`` entry of the official output, ``[B, 128, La]``."""
        conditions = self.prepare_conditions(clip_feat=clip_feat, sync_feat=sync_feat, cond=cond, audio_len=x.shape[-1])
        return self.predict_flow(x, t, conditions)


def init_dit_weights(model: FoleyDiT, generator: torch.Generator | None = None, std: float = 0.02) -> FoleyDiT:
    """Seeded random weights for demos and tests (not the official training init: it zeroes the
    modulation and output layers, which would make an untrained model output exactly zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim >= 2 and "sync_pos_emb" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(fan_in**-0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std))
    return model


def build_dit(
    model_kwargs: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
) -> FoleyDiT:
    """Build the denoiser from an official yaml's ``model_kwargs``.

    On ``device="meta"`` nothing is allocated (for manifests, or to load a checkpoint with
    ``assign=True`` straight into the target dtype). Elsewhere the weights are seeded random ones
    (``seed``), to be overwritten by ``load_state_dict`` for real use.
    """
    cfg = DiTConfig.from_model_kwargs(model_kwargs)
    with torch.device("meta"):
        model = FoleyDiT(cfg)
    model = model.to(dtype=dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init_dit_weights(model, gen)
    return model.eval()
