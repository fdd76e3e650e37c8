"""The light decoder's optional adversarial term: discriminator shapes, losses, a short GAN run that
logs and resumes, and the default (off) path unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from foleyserve.cli import main
from foleyserve.distill import train_decoder as td
from foleyserve.distill.discriminator import (
    DecoderDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
)
from foleyserve.pipeline.demo import sample_clip_path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("adv")
    csv = root / "clips.csv"
    csv.write_text(f"video,prompt\n{sample_clip_path()},footsteps on gravel\n")
    assert main(["distill", "prepare", str(csv), "--out", str(root / "data"), "--demo", "--duration", "1",
                 "--seeds-per-clip", "2", "--teacher-steps", "8", "--student-steps", "2", "4"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    from foleyserve.pipeline.demo import demo_components

    return demo_components(torch.device("cpu")).dac


def test_discriminator_shapes_and_losses() -> None:
    torch.manual_seed(0)
    disc = DecoderDiscriminator()
    wave = torch.randn(2, 1, 4000) * 0.1
    outs = disc(wave)
    assert len(outs) == 5 + 3  # five periods, three STFT resolutions
    for logits, feats in outs:
        assert logits.shape[0] == 2 and logits.ndim == 2 and feats and all(f.shape[0] == 2 for f in feats)
    # Gradients reach the generated waveform through both GAN terms.
    fake = (wave * 0.5).requires_grad_(True)
    real_out, fake_out = disc(wave), disc(fake)
    g = generator_adv_loss(fake_out) + 2.0 * feature_matching_loss(real_out, fake_out)
    g.backward()
    assert torch.isfinite(g) and fake.grad is not None and fake.grad.abs().sum() > 0
    # The discriminator learns to tell a sine from silence-ish noise in a few steps.
    real = torch.sin(torch.linspace(0, 400, 4000)).reshape(1, 1, -1).repeat(2, 1, 1)
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
    losses = []
    for _ in range(8):
        loss = discriminator_loss(disc(real), disc(wave))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def _opts(**kw) -> td.DecoderTrainOptions:
    return td.DecoderTrainOptions(batch_size=2, segment=8, checkpoint_every=2, log_every=1, seed=3, **kw)


def test_gan_run_logs_its_parts_and_resumes(data, teacher, tmp_path) -> None:
    out = tmp_path / "gan"
    td.train_decoder(teacher, data, out, _opts(iterations=2, adversarial_weight=1.0, adversarial_start=1))
    state = torch.load(out / td.STATE_FILE, weights_only=False)
    assert "disc" in state and "disc_optim" in state and state["iteration"] == 2
    td.train_decoder(teacher, data, out, _opts(iterations=4, adversarial_weight=1.0, adversarial_start=1))
    rows = [json.loads(line) for line in (out / td.LOG_FILE).read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert "adv" not in rows[0]  # warm-up: spectral losses only
    for r in rows[1:]:
        assert {"adv", "fm", "disc"} <= set(r) and all(map(lambda v: v == v, r.values()))
    assert torch.load(out / td.STATE_FILE, weights_only=False)["iteration"] == 4
    assert (out / "light-decoder.safetensors").is_file()


def test_state_without_discriminator_resumes(data, teacher, tmp_path) -> None:
    out = tmp_path / "old"
    td.train_decoder(teacher, data, out, _opts(iterations=2))
    assert "disc" not in torch.load(out / td.STATE_FILE, weights_only=False)
    td.train_decoder(teacher, data, out, _opts(iterations=3))  # GAN off, as before
    td.train_decoder(teacher, data, out, _opts(iterations=4, adversarial_weight=0.5))  # GAN on: a fresh discriminator
    rows = [json.loads(line) for line in (out / td.LOG_FILE).read_text().splitlines()]
    assert "adv" not in rows[2] and "adv" in rows[3]


def test_off_builds_no_discriminator_and_is_deterministic(data, teacher, tmp_path, monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a discriminator was built with adversarial_weight 0")

    monkeypatch.setattr(td, "DecoderDiscriminator", refuse)
    weights = []
    for name in ("a", "b"):
        td.train_decoder(teacher, data, tmp_path / name, _opts(iterations=2))
        weights.append(torch.load(tmp_path / name / td.STATE_FILE, weights_only=False)["light"])
        assert "adv" not in (tmp_path / name / td.LOG_FILE).read_text()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cli_refuses_negative_adversarial_flags(data, tmp_path, capsys) -> None:
    assert main(["distill", "train", str(data), "--out", str(tmp_path / "x"), "--target", "decoder",
                 "--adversarial-weight", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--adversarial-weight" in err and len(err.strip().splitlines()) == 1
    assert main(["distill", "train", str(data), "--out", str(tmp_path / "x"), "--target", "decoder",
                 "--adversarial-start", "-3"]) == 2
