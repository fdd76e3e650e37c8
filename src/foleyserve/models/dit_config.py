"""The denoiser's configuration: the official ``model_kwargs`` as a checked dataclass, and the
released models' presets (XXL, XL) plus the conformance fixtures' tiny one."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

@dataclass(frozen=True)
class DiTConfig:
    """The model_kwargs the official model reads, with the official constructor's defaults."""

    depth_triple_blocks: int = 19
    depth_single_blocks: int = 38
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    mlp_act_type: str = "gelu_tanh"
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_type: str = "rms"
    interleaved_audio_visual_rope: bool = False
    sync_modulation: bool = False
    add_sync_feat_to_audio: bool = False
    use_attention_mask: bool = False
    condition_projection: str = "linear"
    sync_feat_dim: int = 768
    sync_in_ksz: int = 1
    condition_dim: int = 768
    clip_dim: int = 768
    audio_vae_latent_dim: int = 128
    audio_frame_rate: int = 50
    clip_length: int = 64
    sync_length: int = 192
    # Keys the official model accepts but never reads (see the research notes, quirk 13).
    ignored: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_model_kwargs(cls, kwargs: Mapping[str, Any]) -> "DiTConfig":
        known = {f.name for f in fields(cls)} - {"ignored"}
        cfg = cls(
            **{k: v for k, v in kwargs.items() if k in known},
            ignored={k: v for k, v in kwargs.items() if k not in known},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        # Variants the released checkpoints never use; the official code has them half-wired. Refuse
        # them loudly rather than produce numbers nobody has checked.
        unsupported = []
        if not self.interleaved_audio_visual_rope:
            unsupported.append("interleaved_audio_visual_rope=False")
        if self.sync_modulation or not self.add_sync_feat_to_audio:
            unsupported.append("sync conditioning other than add_sync_feat_to_audio=True, sync_modulation=False")
        if self.use_attention_mask:
            unsupported.append("use_attention_mask=True")
        if not self.qk_norm or self.qk_norm_type != "rms":
            unsupported.append(f"qk_norm={self.qk_norm}/{self.qk_norm_type} (only RMS qk-norm)")
        if self.mlp_act_type != "gelu_tanh":
            unsupported.append(f"mlp_act_type={self.mlp_act_type!r}")
        if self.condition_projection != "linear":
            unsupported.append(f"condition_projection={self.condition_projection!r}")
        if self.sync_in_ksz not in (1, 3):
            unsupported.append(f"sync_in_ksz={self.sync_in_ksz}")
        if unsupported:
            raise NotImplementedError("unsupported HunyuanVideo-Foley config: " + "; ".join(unsupported))


_RELEASED_COMMON: dict[str, Any] = {
    "mlp_ratio": 4,
    "mlp_act_type": "gelu_tanh",
    "qkv_bias": True,
    "qk_norm": True,
    "qk_norm_type": "rms",
    "attn_mode": "torch",
    "embedder_type": "default",
    "interleaved_audio_visual_rope": True,
    "enable_learnable_empty_visual_feat": True,
    "sync_modulation": False,
    "add_sync_feat_to_audio": True,
    "cross_attention": True,
    "use_attention_mask": False,
    "condition_projection": "linear",
    "sync_feat_dim": 768,
    "condition_dim": 768,
    "clip_dim": 768,
    "audio_vae_latent_dim": 128,
    "audio_frame_rate": 50,
    "patch_size": 1,
    "rope_dim_list": None,
    "rope_theta": 10000,
    "text_length": 77,
    "clip_length": 64,
    "sync_length": 192,
    "depth_triple_ssl_encoder": None,
    "depth_single_ssl_encoder": 8,
    "use_repa_with_audiossl": True,
}


def xxl_config() -> dict[str, Any]:
    """model_kwargs of ``configs/hunyuanvideo-foley-xxl.yaml`` (5.13 B parameters)."""
    return {**_RELEASED_COMMON, "depth_triple_blocks": 18, "depth_single_blocks": 36, "hidden_size": 1536, "num_heads": 12}


def xl_config() -> dict[str, Any]:
    """model_kwargs of ``configs/hunyuanvideo-foley-xl.yaml`` (2.91 B parameters)."""
    return {**_RELEASED_COMMON, "depth_triple_blocks": 12, "depth_single_blocks": 24, "hidden_size": 1408, "num_heads": 11}


def tiny_config() -> dict[str, Any]:
    """The conformance fixtures' tiny model: XXL with d=128, 2 heads, 2+2 blocks (3.9 M parameters)."""
    return {**xxl_config(), "hidden_size": 128, "num_heads": 2, "depth_triple_blocks": 2, "depth_single_blocks": 2}
