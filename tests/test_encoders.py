import json
import socket

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import ClapConfig, ClapModel, SiglipConfig, SiglipModel, SiglipVisionModel

from foleyserve.models.encoders import (
    CLAP_TEXT_CONFIG,
    SIGLIP2_VISION_CONFIG,
    PromptTooLongError,
    build_clap_text,
    build_siglip_vision,
    clap_text_config,
    encode_frames_siglip,
    encode_prompts,
    load_clap_text,
    load_siglip_vision,
)
from foleyserve.models.loading import CheckpointMismatchError

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=64, patch_size=16)
CORPUS = [
    "a dog barks loudly in the rain", "footsteps on gravel, noisy harsh wind",
    "glass shatters on a tiled kitchen floor", "a car engine starts and drives away",
]


@pytest.fixture
def offline(monkeypatch):
    """Hub disabled and every socket connection refused and recorded.

    Attempts are recorded as well as refused because transformers swallows some lookup errors
    (optional files); the test fails on any attempt, even one whose error was caught.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A laion-style folder: full ClapModel weights plus a RoBERTa byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("clap")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=320, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))  # vocab.json + merges.txt, the files laion ships
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer", "model_max_length": 512}))
    config = ClapConfig(
        text_config=dict(vocab_size=bpe.get_vocab_size(), max_position_embeddings=40, **TINY_TEXT),
        audio_config=dict(depths=[1, 1, 1, 1], hidden_size=32, patch_embeds_hidden_size=8, num_attention_heads=[1, 1, 1, 1],
                          window_size=2, spec_size=32, num_mel_bins=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    full = ClapModel(config).eval()
    full.save_pretrained(str(path))
    return path, full


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    config = SiglipConfig(text_config=dict(vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, **TINY_TEXT), vision_config=TINY_VISION)
    torch.manual_seed(1)
    full = SiglipModel(config).eval()
    full.save_pretrained(str(path))
    return path, full


def prompt_with(tokenizer, n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens, <s> and </s> included."""
    for words in range(1, n_tokens + 1):
        text = " ".join(["the rain"] * words) + " a"
        count = len(tokenizer(text)["input_ids"])
        if count >= n_tokens:
            break
    for cut in range(len(text), 0, -1):
        if len(tokenizer(text[:cut])["input_ids"]) == n_tokens:
            return text[:cut]
    raise AssertionError("could not build the prompt")


@pytest.fixture(scope="module")
def clap(clap_dir):
    return load_clap_text(clap_dir[0])


# ------------------------------------------------------------------------------------ configs


def test_configs_match_reference(reference_dir):
    ref = json.loads((reference_dir / "hf-configs.json").read_text())
    vision = {k: v for k, v in ref["siglip2"]["vision_config_effective"].items() if not k.startswith("_") and k != "derived"}
    assert vision == SIGLIP2_VISION_CONFIG
    text = {k: v for k, v in ref["clap"]["text_config_effective"].items() if k not in ("derived", "position_embedding_type")}
    assert text == CLAP_TEXT_CONFIG
    # defaults of the installed transformers agree, so the explicit values change nothing
    defaults = clap_text_config().to_dict()
    assert all(defaults[k] == v for k, v in CLAP_TEXT_CONFIG.items())


def test_full_size_parameter_counts(reference_dir):
    ref = json.loads((reference_dir / "hf-configs.json").read_text())
    with torch.device("meta"):
        vision = build_siglip_vision()
        text = build_clap_text()
    assert sum(p.numel() for p in vision.parameters()) == ref["siglip2"]["param_counts"]["vision_model (incl. MAP head)"]
    assert sum(p.numel() for p in text.parameters()) == ref["clap"]["param_counts"]["ClapTextModelWithProjection_total"]


def test_random_builders_are_seeded_eval_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_clap_text(seed=5, vocab_size=64, **TINY_TEXT)
    assert torch.equal(torch.rand(1), expected)
    b = build_clap_text(seed=5, vocab_size=64, **TINY_TEXT)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------ CLAP


def test_clap_loads_offline_text_tower_only(clap_dir, offline):
    path, full = clap_dir
    tokenizer, model = load_clap_text(path)
    assert not model.training
    assert not any(name.startswith("audio") for name in model.state_dict())
    expected = full.text_model.state_dict()
    for key, value in model.text_model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert tokenizer(["a dog"])["input_ids"][0][0] == tokenizer.bos_token_id


def test_clap_loads_pytorch_bin_without_constant_buffers(tmp_path, clap_dir, clap, offline):
    # laion ships pytorch_model.bin; older saves also lack the constant position/token-type buffers.
    path, full = clap_dir
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = {k: v for k, v in full.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    tokenizer, model = load_clap_text(tmp_path)
    emb = model.text_model.embeddings
    assert torch.equal(emb.position_ids, torch.arange(40)[None])
    assert torch.equal(emb.token_type_ids, torch.zeros(1, 40, dtype=torch.long))
    a = encode_prompts(tokenizer, model, "noisy, harsh", "a dog barks")
    b = encode_prompts(*clap, "noisy, harsh", "a dog barks")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_clap_features_match_official_recipe(clap):
    tokenizer, model = clap
    neg, prompt = "noisy, harsh", "glass shatters on a tiled kitchen floor"
    text_feat, uncond = encode_prompts(tokenizer, model, neg, prompt)
    inputs = tokenizer([neg, prompt], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True, return_dict=True).last_hidden_state
    assert text_feat.shape == (1, ref.shape[1], 32) and uncond.shape == text_feat.shape
    assert torch.equal(text_feat, ref[1:]) and torch.equal(uncond, ref[:1])
    again = encode_prompts(tokenizer, model, neg, prompt, device="cpu")
    assert torch.equal(again[0], text_feat) and torch.equal(again[1], uncond)


def test_uncond_depends_on_prompt_length(clap):
    tokenizer, model = clap
    neg = "noisy, harsh"
    n_neg = len(tokenizer(neg)["input_ids"])
    _, short = encode_prompts(tokenizer, model, neg, "a dog")
    _, long = encode_prompts(tokenizer, model, neg, "a car engine starts and drives away in the rain")
    # Longer positive prompt -> more <pad> rows in the negative branch; those rows reach the DiT.
    assert long.shape[1] > short.shape[1] >= n_neg
    assert long.shape[1] - n_neg >= 5
    pads = long[0, n_neg:]
    assert pads.abs().sum() > 0
    # the real tokens are unchanged (the mask hides the pads from them) ...
    torch.testing.assert_close(long[:, :n_neg], short[:, :n_neg], rtol=0, atol=1e-5)
    # ... and differ from encoding the negative prompt alone only by the extra rows
    alone = encode_prompts(tokenizer, model, neg, neg)[1]
    assert alone.shape[1] == n_neg and long.shape != alone.shape


def test_truncation_to_77_tokens_only_when_longer(clap):
    tokenizer, model = clap
    prompt = prompt_with(tokenizer, 30)  # within the tiny model's 38 usable positions
    full_len = 30
    text_feat, uncond = encode_prompts(tokenizer, model, "rain", prompt, max_tokens=10)
    assert text_feat.shape[1] == 10 and uncond.shape[1] == 10
    untouched, _ = encode_prompts(tokenizer, model, "rain", prompt)
    assert untouched.shape[1] == full_len
    torch.testing.assert_close(text_feat, untouched[:, :10], rtol=0, atol=0)


def test_too_long_prompt_is_an_error(clap):
    tokenizer, model = clap
    # tiny model: 40 positions -> 38 tokens including <s> and </s>
    with pytest.raises(PromptTooLongError, match=r"positive prompt has \d+ tokens.*at most 38"):
        encode_prompts(tokenizer, model, "rain", prompt_with(tokenizer, 39))
    with pytest.raises(PromptTooLongError, match=r"negative prompt has 39 tokens"):
        encode_prompts(tokenizer, model, prompt_with(tokenizer, 39), "rain")
    text_feat, _ = encode_prompts(tokenizer, model, "rain", prompt_with(tokenizer, 38))  # the limit still fits
    assert text_feat.shape[1] == 38


def test_training_mode_is_refused(clap):
    tokenizer, model = clap
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            encode_prompts(tokenizer, model, "a", "b")
    finally:
        model.eval()


def test_missing_weights_are_an_error(tmp_path, clap_dir):
    from safetensors.torch import load_file, save_file

    path, _ = clap_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(path / "model.safetensors"))
    del sd["text_model.encoder.layer.0.output.dense.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="1 missing.*layer.0.output.dense.weight"):
        load_clap_text(broken)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_clap_text(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------ SigLIP


def test_siglip_loads_offline_vision_tower_only(siglip_dir, offline):
    path, full = siglip_dir
    model = load_siglip_vision(path)
    assert isinstance(model, SiglipVisionModel) and not model.training
    assert not any("text" in name for name, _ in model.named_parameters())
    n_vision = sum(p.numel() for p in full.vision_model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_vision

    frames = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    feats = encode_frames_siglip(model, frames, batch_size=2)
    with torch.no_grad():
        official = full.get_image_features(pixel_values=frames)
    # transformers 5 returns the model output here; 4.x returned the pooled tensor
    official = getattr(official, "pooler_output", official)
    assert feats.shape == (5, 32)
    torch.testing.assert_close(feats, official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode_frames_siglip(full, frames), official, rtol=1e-5, atol=1e-5)


def test_siglip_chunking_and_shape_checks():
    model = build_siglip_vision(seed=3, **TINY_VISION)
    frames = torch.rand(7, 3, 64, 64) * 2 - 1
    whole = encode_frames_siglip(model, frames)
    torch.testing.assert_close(encode_frames_siglip(model, frames, batch_size=3), whole, rtol=1e-5, atol=1e-5)
    assert encode_frames_siglip(model, frames[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="resize"):
        encode_frames_siglip(model, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        encode_frames_siglip(model, torch.zeros(3, 64, 64))
