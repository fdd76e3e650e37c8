"""The turbo tier (issue 12): distill prepare -> train -> eval end to end on the demo teacher, the
student and light-decoder files, the engine hook, and the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from foleyserve.cli import main
from foleyserve.config import EngineConfig
from foleyserve.distill.data import EVAL_SEED_BASE, TrajectoryRecorder, load_clips, state_sigmas
from foleyserve.distill.light_decoder import build_light_dac, decoder_params, light_config_for, load_light_decoder
from foleyserve.distill.student import OWN_PREFIX, StudentRecipe, load_student, read_recipe, save_student
from foleyserve.models.dit import build_dit
from foleyserve.models.vae import build_dac
from foleyserve.pipeline.demo import DEMO_DAC, demo_components, demo_dit_config, sample_clip_path
from foleyserve.pipeline.random_models import OFFICIAL_DAC_KWARGS
from foleyserve.pipeline.sampler import flow_match_schedule, initial_noise, sample_latents


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One tiny prepare -> train (student, decoder) -> eval, shared by the tests below."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("distill")
    csv = root / "clips.csv"
    csv.write_text(f"video,prompt\n{sample_clip_path()},footsteps on gravel\n")
    data, out = root / "data", root / "run"
    common = ["--demo", "--duration", "1", "--seeds-per-clip", "2", "--teacher-steps", "8", "--student-steps", "2", "4"]
    assert main(["distill", "prepare", str(csv), "--out", str(data), *common]) == 0
    assert main(["distill", "train", str(data), "--out", str(out), "--steps", "4", "--iterations", "6", "--batch-size", "2",
                 "--checkpoint-every", "3", "--rollout-weight", "1", "--rollout-start", "3", "--device", "cpu"]) == 0
    assert main(["distill", "train", str(data), "--out", str(out), "--target", "decoder", "--iterations", "4",
                 "--batch-size", "2", "--segment", "8", "--device", "cpu"]) == 0
    report = root / "eval.json"
    assert main(["distill", "eval", str(data), "--student", str(out / "student-k4.safetensors"), "--light-decoder",
                 str(out / "light-decoder.safetensors"), "--reference-steps", "8", "--seeds-per-clip", "1", "--train-seeds", "1",
                 "--json", str(report), "--device", "cpu"]) == 0
    return {"root": root, "csv": csv, "data": data, "out": out, "report": report}


def test_prepare_writes_resumable_shards(run, capsys) -> None:
    manifest = json.loads((run["data"] / "manifest.json").read_text())
    assert manifest["samples"] == 2 and manifest["state_sigmas"] == [0.75, 0.5, 0.25]
    (clip,) = load_clips(run["data"])
    assert clip.latent.shape[0] == 2 and clip.states.shape[:2] == (3, 2)
    assert all(s < EVAL_SEED_BASE for s in clip.seeds)
    # The evaluation's noise really is other noise: the generator keeps a seed's low 32 bits only.
    assert EVAL_SEED_BASE < 2**32
    assert not any(torch.equal(initial_noise(1, 8, seed=EVAL_SEED_BASE + k), initial_noise(1, 8, seed=s))
                   for k in range(4) for s in clip.seeds)
    # The noise is rebuilt from the seeds, and the teacher's sample is what the sampler gives for it.
    teacher = demo_components(torch.device("cpu")).dit
    again = sample_latents(teacher, noise=clip.noise(), clip_feat=clip.siglip[None], sync_feat=clip.sync[None],
                           text_feat=clip.text[None], uncond_text_feat=clip.uncond[None], steps=8, guidance_scale=4.5)
    assert torch.allclose(again, clip.latent, atol=1e-4)
    # A second run with the same options finds every shard and does nothing; other options are refused.
    before = (run["data"] / "shard-00000.safetensors").stat().st_mtime_ns
    args = ["distill", "prepare", str(run["csv"]), "--out", str(run["data"]), "--demo", "--duration", "1",
            "--seeds-per-clip", "2", "--teacher-steps", "8", "--student-steps", "2", "4"]
    assert main(args) == 0
    assert (run["data"] / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert main([*args[:-2], "2"]) == 2
    assert "other options" in capsys.readouterr().err


def test_trajectory_states_interpolate_the_euler_path() -> None:
    sig = flow_match_schedule(4).sigmas  # 1, .75, .5, .25, 0
    noise = torch.zeros(1, 2, 3)
    rec = TrajectoryRecorder(sig, [0.625], noise)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        rec(step, 4, torch.full((1, 2, 3), value))
    assert torch.allclose(rec.states[0], torch.full((1, 2, 3), 1.5))  # halfway between the .75 and .5 states
    assert state_sigmas([4, 8])[:3] == [0.875, 0.75, 0.625]


def test_student_file_has_the_official_keys_and_its_recipe(run) -> None:
    path = run["out"] / "student-k4.safetensors"
    official = set(build_dit(demo_dit_config(), device="meta").state_dict())
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert official <= keys and {k for k in keys - official} == {f"{OWN_PREFIX}sigmas.k4"}
    recipe = read_recipe(path)
    assert recipe.steps == 4 and recipe.distilled_guidance == 4.5 and "PeRFlow" in recipe.method
    dit, again = load_student(path)
    assert again == recipe and sum(p.numel() for p in dit.parameters()) == sum(
        p.numel() for p in demo_components(torch.device("cpu")).dit.parameters())
    # Training resumed from its checkpoint and logged JSON lines.
    lines = [json.loads(x) for x in (run["out"] / "train_log.jsonl").read_text().splitlines()]
    assert lines[-1]["iteration"] == 6 and all("loss" in x for x in lines)


def test_eval_reports_every_variant(run) -> None:
    report = json.loads(run["report"].read_text())
    assert set(report["variants"]) == {"teacher-4-cfg", "student-4", "student-4+light", "light-decoder"}
    for v in report["variants"].values():
        assert {"latent_rel_l2", "snr_db", "log_mel_db", "decode_s"} <= set(v)
    assert report["light_decoder_params"] <= 0.2 * report["teacher_decoder_params"]
    # Where the error comes from: the state after each of the 4 steps, the last being the sample.
    for name in ("teacher-4-cfg", "student-4"):
        path = report["variants"][name]["step_rel_l2"]
        assert len(path) == 4 and path[-1] == pytest.approx(report["variants"][name]["latent_rel_l2"])
        assert all(x > 0 for x in path)
    assert set(report["train_noise"]) == {"student-4", "student-4+light"} and report["train_seeds_per_clip"] == 1


def test_eval_step_errors_follow_the_reference_path(run) -> None:
    from foleyserve.distill.evaluate import evaluate
    from foleyserve.distill.turbo import teacher_components

    comps = teacher_components({"demo": True}, torch.device("cpu"), torch.float32)
    dit, _ = load_student(run["out"] / "student-k4.safetensors")
    # With the reference at 4 guided steps, the 4-step teacher IS the reference: every state matches.
    report = evaluate(comps.dit, comps.dac, run["data"], students={4: dit}, reference_steps=4, seeds_per_clip=1, train_seeds=1)
    assert report["variants"]["teacher-4-cfg"]["step_rel_l2"] == [0.0, 0.0, 0.0, 0.0]
    student = report["variants"]["student-4"]["step_rel_l2"]
    assert len(student) == 4 and student[0] > 0
    # The training split ran the student on the prepared noise: its rows exist and differ from new noise.
    assert report["train_noise"]["student-4"]["latent_rel_l2"] != report["variants"]["student-4"]["latent_rel_l2"]


def test_engine_samples_with_the_students_recipe(run) -> None:
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest

    student_path, light_path = run["out"] / "student-k4.safetensors", run["out"] / "light-decoder.safetensors"
    for precision, step_cache in (("fp32", None), ("bf16", 0.05)):
        engine = Engine.from_config(EngineConfig(demo=True, precision=precision, student=student_path,
                                                 light_decoder=light_path, step_cache=step_cache))
        assert engine.components.dac.light_config is not None and "student" in engine.components.name
        request = GenerationRequest(video=sample_clip_path(), prompt="footsteps", steps=50, guidance=4.5, duration=1.0)
        job = engine.prepare(request)
        assert (job.request.steps, job.request.guidance) == (4, 1.0)
        (latents,) = engine.sample_jobs([job])
        if precision == "fp32":
            student, _ = load_student(student_path)
            ref = sample_latents(student, noise=initial_noise(1, job.latent_length, seed=0), clip_feat=job.visual.siglip,
                                 sync_feat=job.visual.sync, text_feat=job.text.text, uncond_text_feat=job.text.uncond,
                                 steps=4, guidance_scale=1.0)
            assert torch.allclose(latents, ref, atol=1e-4)
        result = engine.finish(job, latents)
        assert torch.isfinite(result.waveform).all() and result.waveform.shape[-1] == 960 * job.latent_length


def test_light_decoder_fits_the_parameter_budget() -> None:
    for kwargs in (OFFICIAL_DAC_KWARGS, DEMO_DAC):
        with torch.device("meta"):
            teacher = build_dac(kwargs, decoder_only=True)
        light = build_light_dac(light_config_for(teacher))
        assert decoder_params(light) <= 0.2 * decoder_params(teacher)
    z = torch.randn(1, 128, 5)
    assert light.decode(z).shape == (1, 1, 4800)


def test_light_decoder_round_trips(tmp_path: Path) -> None:
    from foleyserve.distill.light_decoder import save_light_decoder

    teacher = build_dac(DEMO_DAC, decoder_only=True)
    light = build_light_dac(light_config_for(teacher))
    save_light_decoder(tmp_path / "d.safetensors", light)
    again = load_light_decoder(tmp_path / "d.safetensors")
    z = torch.randn(1, 128, 4)
    with torch.no_grad():
        assert torch.equal(light.decode(z), again.decode(z))


def test_student_round_trips_its_recipe(tmp_path: Path) -> None:
    dit = build_dit(demo_dit_config(), seed=1)
    recipe = StudentRecipe(steps=8, trained_steps=(8,), distilled_guidance=4.5, model_kwargs=demo_dit_config(), shift=1.0)
    save_student(tmp_path / "s.safetensors", dit, recipe)
    loaded, again = load_student(tmp_path / "s.safetensors")
    assert again.sigmas().tolist() == torch.linspace(1, 0, 9).tolist()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), dit.state_dict().values()))
    with pytest.raises(ValueError, match="fused for inference"):
        save_student(tmp_path / "f.safetensors", dit.fuse_for_inference(), recipe)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["distill", "prepare", "/nonexistent.csv", "--out", "x", "--demo"], "does not exist"),
        (["distill", "prepare", "{csv}", "--out", "x", "--demo", "--student-steps", "0"], "--student-steps"),
        (["distill", "prepare", "{csv}", "--out", "x", "--demo", "--seeds-per-clip", "0"], "--seeds-per-clip must be positive"),
        (["distill", "prepare", "{csv}", "--out", "x", "--demo", "--seed", str(2**31 - 1), "--seeds-per-clip", "2"], "are the evaluation's"),
        (["distill", "train", "/nonexistent", "--out", "x"], "not a prepared data folder"),
        (["distill", "train", "{data}", "--out", "x", "--steps", "3"], "holds trajectories for"),
        (["distill", "train", "{data}", "--out", "x", "--first-window-share", "1"], "--first-window-share must be between"),
        (["distill", "eval", "{data}"], "nothing to evaluate"),
        (["distill", "eval", "{data}", "--train-seeds", "2"], "--train-seeds measures students"),
        (["distill", "eval", "{data}", "--student", "{csv}"], "not a safetensors file"),
        (["generate", "{video}", "--demo", "--student", "/nonexistent.safetensors", "--out", "{root}/o.wav"], "does not exist"),
        (["generate", "{video}", "--demo", "--light-decoder", "{student}", "--out", "{root}/o.wav"], "not a light decoder"),
        # The turbo profile's example paths do not exist here: serve says which flags to pass.
        (["serve", "--profile", "turbo", "--demo", "--port", "0"], "pass --student and --light-decoder"),
        (["serve", "--demo", "--student", "{csv}"], "not a safetensors file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, capsys, argv: list[str], message: str) -> None:
    fill = {"csv": run["csv"], "data": run["data"], "video": sample_clip_path(), "root": run["root"],
            "student": run["out"] / "student-k4.safetensors"}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_gradient_checkpointing_gives_the_same_gradients(run) -> None:
    from foleyserve.distill.train_student import StudentTrainOptions, student_loss

    (clip,) = load_clips(run["data"])
    grads = []
    for ckpt in (False, True):
        dit = demo_components(torch.device("cpu")).dit.train()
        opts = StudentTrainOptions(steps=4, grad_checkpointing=ckpt, rollout_weight=1.0)
        loss, _ = student_loss(dit, clip, [0, 1], opts, torch.Generator().manual_seed(0), torch.device("cpu"), rollout=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in dit.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_rollout_term_is_the_relative_error_of_the_samplers_output(run) -> None:
    # The end-to-end term must score what the engine's sampler produces (uniform grid, no CFG).
    from foleyserve.distill.train_student import StudentTrainOptions, student_loss

    (clip,) = load_clips(run["data"])
    dit, _ = load_student(run["out"] / "student-k4.safetensors")
    opts = StudentTrainOptions(steps=4, rollout_weight=2.0)
    loss, parts = student_loss(dit, clip, [0, 1], opts, torch.Generator().manual_seed(0), torch.device("cpu"), rollout=True)
    with torch.no_grad():
        sample = sample_latents(dit, noise=clip.noise([0, 1]), clip_feat=clip.siglip[None], sync_feat=clip.sync[None],
                                text_feat=clip.text[None], uncond_text_feat=clip.uncond[None], steps=4, guidance_scale=1.0)
    want = float((sample - clip.latent[[0, 1]]).pow(2).mean().sqrt() / clip.latent[[0, 1]].pow(2).mean().sqrt())
    assert abs(parts["rollout_rel_l2"] - want) < 1e-4 * want
    assert abs(loss.item() - (parts["window"] + 2.0 * want**2)) < 1e-4 * loss.item()
    log = [json.loads(line) for line in (run["out"] / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 6 and log[-1]["rollout_rel_l2"] > 0  # the fixture's run turned the term on at 3


def test_serve_flags_override_the_turbo_profile(run) -> None:
    from foleyserve.cli import build_parser
    from foleyserve.commands import serve

    args = build_parser().parse_args(["serve", "--profile", "turbo", "--demo", "--student", str(run["out"] / "student-k4.safetensors"),
                              "--light-decoder", str(run["out"] / "light-decoder.safetensors"), "--encoder-precision", "fp16"])
    engine, _server = serve.configs_from_args(args, environ={})
    assert engine.student == run["out"] / "student-k4.safetensors"
    assert engine.light_decoder == run["out"] / "light-decoder.safetensors"
    assert engine.encoder_precision == "fp16"  # the flag wins over the profile's bf16


def test_first_window_share_draws_the_first_window(run) -> None:
    from foleyserve.distill.train_student import window_batch

    clip = load_clips(run["data"])[0]
    rows = [0, 1] * 200
    gen = torch.Generator().manual_seed(0)
    _, sigma, _ = window_batch(clip, rows, 4, 1.0, gen, first_window_share=0.7)
    first = (sigma == 1.0).float().mean().item()
    assert 0.6 < first < 0.8 and set(sigma.tolist()) == {1.0, 0.75, 0.5, 0.25}
    _, sigma, _ = window_batch(clip, rows, 4, 1.0, gen)
    assert 0.15 < (sigma == 1.0).float().mean().item() < 0.35


def test_a_shifted_student_grid_from_prepare_to_the_engine(run, tmp_path: Path) -> None:
    """--student-shift: states at the shifted grid, a student trained and recorded on it, and the
    engine and eval sampling it there (not on the official uniform schedule)."""
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.requests import GenerationRequest

    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["distill", "prepare", str(run["csv"]), "--out", str(data), "--demo", "--duration", "1", "--seeds-per-clip", "2",
                 "--teacher-steps", "8", "--student-steps", "4", "--student-shift", "3"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["state_sigmas"] == pytest.approx([0.9, 0.75, 0.5])
    assert main(["distill", "train", str(data), "--out", str(out), "--steps", "4", "--iterations", "2", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    path = out / "student-k4.safetensors"
    assert read_recipe(path).shift == 3.0
    with safe_open(str(path), framework="pt") as f:
        assert torch.allclose(f.get_tensor(f"{OWN_PREFIX}sigmas.k4"), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    engine = Engine.from_config(EngineConfig(demo=True, precision="fp32", student=path))
    job = engine.prepare(GenerationRequest(video=sample_clip_path(), prompt="footsteps", duration=1.0))
    (latents,) = engine.sample_jobs([job])
    student, _ = load_student(path)
    kw = dict(noise=initial_noise(1, job.latent_length, seed=0), clip_feat=job.visual.siglip, sync_feat=job.visual.sync,
              text_feat=job.text.text, uncond_text_feat=job.text.uncond, steps=4, guidance_scale=1.0)
    assert torch.allclose(latents, sample_latents(student, shift=3.0, **kw), atol=1e-4)
    assert not torch.allclose(latents, sample_latents(student, **kw), atol=1e-3)
    assert main(["distill", "eval", str(data), "--student", str(path), "--reference-steps", "8", "--seeds-per-clip", "1",
                 "--device", "cpu"]) == 0
