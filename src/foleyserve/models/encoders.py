"""SigLIP2 vision and CLAP text encoders, through the transformers classes the official code uses.

The official pipeline calls ``AutoModel.from_pretrained("google/siglip2-base-patch16-512")``
(which resolves to ``SiglipModel``; only ``get_image_features`` = the vision tower's pooled output
is used) and ``ClapTextModelWithProjection.from_pretrained("laion/larger_clap_general")`` (only
``last_hidden_state`` is used), both in fp32 without autocast. Here:

* ``load_siglip_vision`` / ``load_clap_text`` build the same networks from a local Hugging Face
  directory, never from the hub, and load only the tower that is used: the SigLIP text tower
  (282 M parameters) and the CLAP audio tower are skipped, and any other mismatch is an error.
* ``build_siglip_vision`` / ``build_clap_text`` give random-weight models of the real
  configuration (or shrunk with overrides) for tests and smoke runs.

transformers 5 notes (compared with 4.51.3, the version the official code was checked against):
``SiglipModel.get_image_features`` returns the whole ``BaseModelOutputWithPooling`` instead of the
pooled tensor, so the official ``torch.cat`` of its results would fail; ``SiglipVisionModel`` no
longer wraps a ``vision_model`` submodule (its state-dict keys lost the ``vision_model.`` prefix,
which ``from_pretrained`` strips from full-model checkpoints); ``ClapTextConfig`` dropped
``position_embedding_type`` (only "absolute" was ever used); freshly constructed models start in
training mode, so the random builders put them in eval mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoTokenizer,
    ClapTextConfig,
    ClapTextModelWithProjection,
    PreTrainedTokenizerBase,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from foleyserve.models.loading import CheckpointMismatchError, LoadReport

__all__ = [
    "CLAP_TEXT_CONFIG",
    "ClapTextTower",
    "PromptTooLongError",
    "check_prompt_lengths",
    "check_token_counts",
    "clap_token_limit",
    "SIGLIP2_VISION_CONFIG",
    "SiglipVisionTower",
    "build_clap_text",
    "build_siglip_vision",
    "clap_text_config",
    "encode_frames_siglip",
    "encode_prompts",
    "load_clap_text",
    "load_clap_tokenizer",
    "load_siglip_vision",
    "siglip_vision_config",
]

# Effective vision config of google/siglip2-base-patch16-512 (image_size is the only explicit
# value in its config.json; the rest are SiglipVisionConfig defaults).
SIGLIP2_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 512,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

# Effective text config of laion/larger_clap_general (its text_config has no overrides, so these
# are the ClapTextConfig defaults).
CLAP_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "projection_dim": 512,
    "projection_hidden_act": "relu",
}

# The official text_length: the DiT sees at most this many CLAP tokens.
TEXT_TOKENS = 77

# Buffers that transformers recreates deterministically when a checkpoint lacks them; every
# other missing tensor is an error.
_DERIVED_BUFFERS = ("position_ids", "token_type_ids")


class SiglipVisionTower(SiglipVisionModel):
    """``SiglipVisionModel`` that loads from a full ``SiglipModel`` checkpoint without complaint.

    Only the load-time bookkeeping differs: the text tower and the logit scale/bias are declared
    as expected leftovers, so they are neither read nor reported. Forward is unchanged.
    """

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_(scale|bias)$"]


class ClapTextTower(ClapTextModelWithProjection):
    """``ClapTextModelWithProjection`` that loads from a full ``ClapModel`` checkpoint (audio tower skipped)."""

    _keys_to_ignore_on_load_unexpected = [r"^audio_model\.", r"^audio_projection\.", r"^logit_scale_[at]$"]
    # Older saves may lack these constant buffers; transformers rebuilds them (arange / zeros).
    _keys_to_ignore_on_load_missing = [r"embeddings\.position_ids$", r"embeddings\.token_type_ids$"]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than CLAP has positions."""


# ------------------------------------------------------------------------------------ configs


def siglip_vision_config(**overrides: Any) -> SiglipVisionConfig:
    """The SigLIP2 vision config, optionally changed (e.g. ``num_hidden_layers=1, image_size=64``)."""
    return SiglipVisionConfig(**{**SIGLIP2_VISION_CONFIG, **overrides})


def clap_text_config(**overrides: Any) -> ClapTextConfig:
    """The CLAP text config, optionally changed (e.g. ``num_hidden_layers=1, hidden_size=32``)."""
    return ClapTextConfig(**{**CLAP_TEXT_CONFIG, **overrides})


# ------------------------------------------------------------------------------------ builders


def _finish(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None) -> Any:
    model = model.to(dtype=dtype) if device is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _random_model(cls: type, config: Any, seed: int | None) -> Any:
    if seed is None:
        return cls(config)
    # A private RNG stream: seeding must not disturb the caller's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def build_siglip_vision(
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> SiglipVisionModel:
    """SigLIP2 vision tower with random weights, in eval mode."""
    return _finish(_random_model(SiglipVisionTower, siglip_vision_config(**overrides), seed), dtype, device)


def build_clap_text(
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> ClapTextModelWithProjection:
    """CLAP text model (with its unused projection, as the official class has) with random weights, in eval mode."""
    return _finish(_random_model(ClapTextTower, clap_text_config(**overrides), seed), dtype, device)


# ------------------------------------------------------------------------------------ loading


def _local_dir(model_dir: str | os.PathLike[str], what: str) -> Path:
    # Checked here because transformers would take a missing path for a hub repo id.
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is not a directory; pass a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} has no config.json; pass a local Hugging Face model folder")
    return path


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 5 renamed from_pretrained's torch_dtype to dtype (4.56 accepts both).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _from_local(cls: type, path: Path, dtype: torch.dtype) -> Any:
    # local_files_only makes every file lookup inside transformers/huggingface_hub resolve on
    # disk; nothing global (environment, hub settings) is changed for the rest of the process.
    model, info = cls.from_pretrained(
        str(path), local_files_only=True, output_loading_info=True, **_dtype_kwarg(dtype)
    )
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(
        k for k in info.get("missing_keys", ())
        if k in params or not k.endswith(_DERIVED_BUFFERS)
    )
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ())]
    report = LoadReport(
        module=cls.__name__, source=str(path), missing=missing, unexpected=unexpected, mismatched=mismatched
    )
    if not report.ok:
        raise CheckpointMismatchError(report)
    return model


def load_siglip_vision(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SiglipVisionModel:
    """SigLIP2 vision tower from a local copy of google/siglip2-base-patch16-512, offline.

    The folder holds the full ``SiglipModel`` (``config.json`` with ``model_type: siglip`` and
    weights with ``vision_model.*`` and ``text_model.*`` keys); only the vision tower is built and
    read. With safetensors weights the text tower's bytes are never touched.
    """
    path = _local_dir(model_dir, "SigLIP2")
    return _finish(_from_local(SiglipVisionTower, path, dtype), dtype, device)


def load_clap_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The CLAP RoBERTa tokenizer from a local folder, offline."""
    path = _local_dir(model_dir, "CLAP")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_clap_text(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedTokenizerBase, ClapTextModelWithProjection]:
    """Tokenizer and text model from a local copy of laion/larger_clap_general, offline.

    The checkpoint is the full ``ClapModel``; the audio tower is skipped.
    """
    path = _local_dir(model_dir, "CLAP")
    tokenizer = load_clap_tokenizer(path)
    return tokenizer, _finish(_from_local(ClapTextTower, path, dtype), dtype, device)


# ------------------------------------------------------------------------------------ encoding


def clap_token_limit(max_position_embeddings: int, pad_token_id: int) -> int:
    """Most tokens (``<s>`` and ``</s>`` included) a CLAP text encoder can take."""
    # RoBERTa numbers real tokens from padding_idx + 1, so two of the table's rows are never
    # reachable: 514 positions hold at most 512 tokens, <s> and </s> included.
    return int(max_position_embeddings) - int(pad_token_id) - 1


def _max_tokens_of(model: ClapTextModelWithProjection) -> int:
    return clap_token_limit(model.config.max_position_embeddings, model.config.pad_token_id)


def check_token_counts(tokenizer: PreTrainedTokenizerBase, limit: int, prompt: str, negative: str) -> None:
    """Raise :class:`PromptTooLongError` when either prompt has more than ``limit`` tokens. Only
    the tokenizer runs (well under a millisecond), so the CLI and the service call this before any
    model loads or a request waits in the queue."""
    lengths = [len(tokenizer(text)["input_ids"]) for text in (negative, prompt)]
    too_long = [f"{name} prompt has {n} tokens" for name, n in zip(("negative", "positive"), lengths) if n > limit]
    if too_long:
        raise PromptTooLongError(
            f"{' and '.join(too_long)}; CLAP accepts at most {limit} (including <s> and </s>): shorten it"
        )


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase, model: ClapTextModelWithProjection, prompt: str, negative: str
) -> None:
    """:func:`check_token_counts` with a loaded CLAP's own limit."""
    check_token_counts(tokenizer, _max_tokens_of(model), prompt, negative)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    model: ClapTextModelWithProjection,
    negative: str,
    prompt: str,
    max_tokens: int = TEXT_TOKENS,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP features ``(text_feat, uncond_text_feat)``, each ``[1, L, hidden]``, as the official code makes them.

    Both prompts are tokenized together as ``[negative, prompt]`` with ``padding=True``, i.e. the
    shorter one is padded to the length of the longer, and encoded in one batch with the attention
    mask. The final hidden states of *all* positions are kept, padding included, and then cut to
    the first ``max_tokens`` (77) only if longer. The padding matters: the mask hides ``<pad>``
    tokens from the other tokens, but the ``<pad>`` positions still get hidden states, and the DiT
    attends to them unmasked. So each branch's features, and hence the generated audio, depend on
    the token count of the *other* prompt: ``uncond_text_feat`` changes when only the positive
    prompt gets longer. Encoding the prompts separately, or padding a batch of requests to a
    common length, would not reproduce the official numbers.

    Prompts longer than CLAP's position table (512 tokens with ``<s>`` and ``</s>``) raise
    :class:`PromptTooLongError`. The official code has no output for them (it indexes past the
    table), and truncating would change the hidden states of the first 77 tokens too, because the
    encoder attends in both directions; an error is the only faithful answer.

    ``device`` is where the token ids go (default: the model's device).
    """
    if model.training:
        raise ValueError("the CLAP model is in training mode (dropout would randomise features); call model.eval()")
    check_prompt_lengths(tokenizer, model, prompt, negative)
    inputs = tokenizer([negative, prompt], padding=True, return_tensors="pt")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    inputs = {k: v.to(target) for k, v in inputs.items()}
    with torch.no_grad():
        hidden = model(**inputs, return_dict=True).last_hidden_state
    if hidden.shape[1] > max_tokens:
        hidden = hidden[:, :max_tokens]
    return hidden[1:2], hidden[0:1]


def encode_frames_siglip(
    model: SiglipVisionModel | SiglipModel,
    pixel_values: torch.Tensor,
    batch_size: int = -1,
) -> torch.Tensor:
    """SigLIP2 image features ``[N, hidden]`` (the vision tower's attention-pooled output, no projection).

    ``pixel_values`` is ``[N, 3, S, S]`` in ``[-1, 1]`` (S = 512 for the real model) and may stay on
    the CPU: frames go to the model's device ``batch_size`` at a time (all at once if <= 0, as
    the official code does), which bounds activation and device memory for long videos. A full
    ``SiglipModel`` is accepted too; its vision tower is used.
    """
    tower = model.vision_model if isinstance(model, SiglipModel) else model
    cfg = tower.config
    if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels:
        raise ValueError(f"pixel_values must be [N, {cfg.num_channels}, H, W], got {list(pixel_values.shape)}")
    if tuple(pixel_values.shape[-2:]) != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"frames are {pixel_values.shape[-2]}x{pixel_values.shape[-1]}, the model takes "
            f"{cfg.image_size}x{cfg.image_size}; resize them first"
        )
    n = pixel_values.shape[0]
    step = n if batch_size <= 0 else batch_size
    param = next(tower.parameters())
    chunks = []
    with torch.no_grad():
        for start in range(0, n, max(step, 1)):
            chunk = pixel_values[start : start + step].to(device=param.device, dtype=param.dtype)
            chunks.append(tower(pixel_values=chunk).pooler_output)
    if not chunks:
        return torch.empty(0, cfg.hidden_size, device=param.device, dtype=param.dtype)
    return torch.cat(chunks, dim=0)
