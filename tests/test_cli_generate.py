"""`foleyserve generate` / `foleyserve demo`: bad input gives one clear line and a non-zero exit, never a traceback.

Every case calls ``main([...])`` in process (stderr through capsys); a few also run
``python -m foleyserve`` in a subprocess. All generation uses the demo model with 2 steps on clips of
under a second, made here with PyAV, so the module runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import foleyserve
from foleyserve.cli import main
from foleyserve.pipeline.demo import DEMO_STEPS, demo_precision, demo_tokenizer, sample_clip_path

FAST = ["--demo", "--steps", "2"]
HF_HINT = "hf download tencent/HunyuanVideo-Foley --local-dir"


# ------------------------------------------------------------------------------------ helpers


def write_video(path: Path, *, frames: int = 20, size: tuple[int, int] = (64, 48), fps: int = 25,
                pts_ms: list[int] | None = None, pix_fmt: str = "yuv420p") -> Path:
    """H.264 MP4 of moving colour blocks; ``pts_ms`` gives explicit (variable) frame times."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (i * 12) % 256
            img[: h // 2, (i * 3) % w :, 1] = 200
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=48000)
        a.layout = "mono"
        t = np.arange(24000, dtype=np.float32) / 48000
        frame = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32),
                                           format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        for p in [*a.encode(frame), *a.encode(None)]:
            c.mux(p)
    return path


def streams(path: Path) -> list[tuple]:
    """(type, codec, sample rate, channels) of each stream; audio also checked to decode."""
    out = []
    with av.open(str(path)) as c:
        for s in c.streams:
            cc = s.codec_context
            if s.type == "audio":
                out.append(("audio", cc.name, cc.sample_rate, cc.channels))
            else:
                out.append((s.type, cc.name, None, None))
        if c.streams.audio:
            assert sum(f.samples for f in c.decode(audio=0)) > 0, f"{path}: audio does not decode"
    with av.open(str(path)) as c:
        if c.streams.video:
            assert next(c.decode(video=0), None) is not None, f"{path}: video does not decode"
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str, command: str = "generate") -> str:
    """The one error line of a refused run (after checking exit status and no traceback)."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"foleyserve {command}: error: "), err
    return lines[0]


def cli_env() -> dict[str, str]:
    # The subprocess must run the same foleyserve as this process, whatever the install points to.
    src = str(Path(foleyserve.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    sample = sample_clip_path().read_bytes()
    (d / "truncated.mp4").write_bytes(sample[: len(sample) // 2])
    (d / "notes.mp4").write_text("these are my notes, not a video\n")
    # 3 frames at 20 ms then a 90 ms gap, repeated: a genuinely variable frame rate.
    vfr = [0]
    for i in range(1, 24):
        vfr.append(vfr[-1] + (20 if i % 3 else 90))
    return {
        "tiny": write_video(d / "tiny.mp4"),
        "short": write_video(d / "short.mp4", frames=10),
        "odd": write_video(d / "odd.mp4", size=(33, 17), pix_fmt="yuv444p"),  # 4:2:0 needs even sizes
        "vfr": write_video(d / "vfr.mp4", frames=24, pts_ms=vfr),
        "audio_only": write_audio_only(d / "tone.m4a"),
        "truncated": d / "truncated.mp4",
        "not_video": d / "notes.mp4",
    }


# -------------------------------------------------------------------------- inputs that work


def test_wav_output_is_48k_mono(clips, tmp_path, capsys):
    out = tmp_path / "foley.wav"
    code, stdout, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", out, "--prompt", "footsteps")
    assert code == 0, err
    assert "Traceback" not in err and "DEMO model" in err
    assert f"wrote {out}" in stdout and "48000 Hz" in stdout
    assert streams(out) == [("audio", "pcm_f32le", 48000, 1)]


def test_flac_output(clips, tmp_path, capsys):
    out = tmp_path / "foley.flac"
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", out)
    assert code == 0, err
    assert streams(out) == [("audio", "flac", 48000, 1)]


@pytest.mark.parametrize("clip", ["odd", "vfr"])
def test_odd_size_and_variable_frame_rate_work(clip, clips, tmp_path, capsys):
    out = tmp_path / f"{clip}_foley.mp4"
    code, stdout, err = run(capsys, "generate", clips[clip], *FAST, "--out", out)
    assert code == 0, err
    assert "Traceback" not in err and f"wrote {out}" in stdout
    assert streams(out) == [("video", "h264", None, None), ("audio", "aac", 48000, 2)]


def test_demo_writes_mp4_with_video_and_stereo_aac(tmp_path, capsys):
    out = tmp_path / "demo" / "sample_foley.mp4"
    code, stdout, err = run(capsys, "demo", "--out", out, "--steps", "2")
    assert code == 0, err
    assert "random-weight" in err and "NOISE" in err  # the demo warning
    assert "warning: demo model" in stdout
    assert streams(out) == [("video", "h264", None, None), ("audio", "aac", 48000, 2)]


# ----------------------------------------------------------------------------- bad videos


def test_missing_video(tmp_path, capsys):
    code, _, err = run(capsys, "generate", tmp_path / "nope.mp4", *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "nope.mp4" in line and "does not exist" in line and "check the path" in line


def test_text_file_named_mp4(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["not_video"], *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "notes.mp4" in line and "not a video" in line and "MP4" in line
    assert not (tmp_path / "x.wav").exists()


def test_audio_only_file(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["audio_only"], *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "tone.m4a" in line and "no video stream" in line and "pass a video file" in line


def test_truncated_mp4(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["truncated"], *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "truncated or corrupt" in line and "re-download or re-export" in line


def test_video_shorter_than_one_synchformer_segment(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["short"], *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "too short" in line and "10 frame(s)" in line
    assert "16 frames" in line and "0.64 s" in line and "longer clip" in line


# ----------------------------------------------------------------------------- bad outputs


def test_output_under_a_regular_file(clips, tmp_path, capsys):
    blocker = tmp_path / "report.txt"
    blocker.write_text("a file, not a folder")
    for out in (blocker / "x.wav", blocker / "sub" / "x.mp4"):
        code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", out)
        line = error_line(code, err)
        assert f"cannot write {out}" in line and ("not a folder" in line or "Not a directory" in line)
    code, _, err = run(capsys, "demo", "--out", blocker / "demo.mp4", "--steps", "2")
    assert "cannot write" in error_line(code, err, "demo")


def test_output_is_a_folder(clips, tmp_path, capsys):
    (tmp_path / "out.mp4").mkdir()
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "out.mp4")
    assert "is a folder" in error_line(code, err)


def test_output_with_unknown_suffix(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.ogg")
    line = error_line(code, err)
    assert "x.ogg" in line and ".wav, .flac or .mp4" in line


# ------------------------------------------------------------------------ engine arguments


def test_unknown_precision(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.wav", "--precision", "int8")
    line = error_line(code, err)
    assert "unknown precision 'int8'" in line and "fp32, bf16, fp16" in line


def test_unknown_device(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.wav", "--device", "tpu")
    line = error_line(code, err)
    assert "'tpu'" in line and "auto, cpu, cuda or cuda:N" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_gpu(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.wav", "--device", "cuda")
    line = error_line(code, err)
    assert "no usable CUDA GPU" in line and "--device cpu" in line


# ---------------------------------------------------------------------------- model folder


def test_no_model_given(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert "no model given" in line and "--model-dir" in line and "--demo" in line


def model_args(clips, tmp_path, model_dir: Path) -> list:
    return ["generate", clips["tiny"], "--model-dir", model_dir, "--device", "cpu", "--out", tmp_path / "x.wav"]


def test_model_folder_does_not_exist(clips, tmp_path, capsys):
    code, _, err = run(capsys, *model_args(clips, tmp_path, tmp_path / "HunyuanVideo-Foley"))
    line = error_line(code, err)
    # The download command names the user's own folder, ready to paste.
    assert "does not exist" in line and f"{HF_HINT} {tmp_path / 'HunyuanVideo-Foley'}" in line
    assert "MODEL_DIR" not in line and "huggingface-cli" not in line


def test_model_folder_is_a_file(clips, tmp_path, capsys):
    (tmp_path / "weights").write_text("not a folder")
    code, _, err = run(capsys, *model_args(clips, tmp_path, tmp_path / "weights"))
    line = error_line(code, err)
    assert "not a folder" in line and HF_HINT in line


def test_empty_model_folder_names_every_missing_file(clips, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    code, _, err = run(capsys, *model_args(clips, tmp_path, tmp_path / "models"))
    line = error_line(code, err)
    for name in ("hunyuanvideo_foley.pth", "vae_128d_48k.pth", "synchformer_state_dict.pth"):
        assert name in line
    assert HF_HINT in line


@pytest.mark.parametrize("content", [b"", b"garbage, not weights"], ids=["empty", "garbage"])
def test_model_folder_with_only_the_denoiser(content, clips, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "hunyuanvideo_foley.pth").write_bytes(content)
    code, _, err = run(capsys, *model_args(clips, tmp_path, models))
    line = error_line(code, err)
    assert "vae_128d_48k.pth" in line and "synchformer_state_dict.pth" in line and HF_HINT in line
    assert "hunyuanvideo_foley.pth" not in line  # present: not reported missing


def test_damaged_weights_file(clips, tmp_path, capsys):
    models = tmp_path / "models"
    for name in ("hunyuanvideo_foley.pth", "vae_128d_48k.pth", "synchformer_state_dict.pth"):
        (models / name).parent.mkdir(exist_ok=True)
        (models / name).write_bytes(b"truncated download")
    for repo in ("siglip2-base-patch16-512", "larger_clap_general"):
        (models / repo).mkdir()
        (models / repo / "config.json").write_text("{}")
    # A tokenizer the prompt check (before loading) can use; the damaged weights show at load.
    demo_tokenizer().save_pretrained(models / "larger_clap_general")
    code, _, err = run(capsys, *model_args(clips, tmp_path, models))
    line = error_line(code, err)
    assert "hunyuanvideo_foley.pth" in line and "damaged" in line and HF_HINT in line


# ------------------------------------------------------------------------------ CSV batches


def test_generate_csv_points_to_batch(tmp_path, capsys):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("video,prompt\nclip.mp4,rain\n")
    code, _, err = run(capsys, "generate", "--csv", jobs, "--out-dir", tmp_path / "out", *FAST)
    line = error_line(code, err)
    assert code == 2 and f"foleyserve batch {jobs} --out-dir DIR" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- checked before any model loads


@pytest.fixture
def no_loading(monkeypatch):
    """Records (and refuses) every attempt to build an engine."""
    from foleyserve.pipeline.pipeline import Engine

    calls = []

    def refuse(cls, *args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Engine, "from_config", classmethod(refuse))
    monkeypatch.setattr(Engine, "demo", classmethod(refuse))
    return calls


LONG_PROMPT = "footsteps on gravel " * 60  # about 240 tokens: past the demo CLAP's 128


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--steps", "0"], "steps must be an integer from 1 to 1000"),
        (["--guidance", "-1"], "guidance must be between 0 and 100"),
        (["--seed", "-3"], "seed must be a non-negative integer"),
        (["--keep-original-audio", "0.5"], "mp4 output only"),
        (["--precision", "fp7"], "unknown precision 'fp7'"),
        (["--offload", "sequential", "--compile"], "do not combine"),
        (["--step-cache", "-0.1"], "step_cache must be a threshold >= 0"),
        (["--prompt", LONG_PROMPT], "positive prompt has"),
        (["--negative-prompt", LONG_PROMPT], "negative prompt has"),
    ],
    ids=["steps", "guidance", "seed", "gain-on-wav", "precision", "compile+sequential", "step-cache", "prompt", "negative"],
)
def test_bad_flags_exit_2_before_the_model_loads(extra, expect, clips, tmp_path, capsys, no_loading):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.wav", *extra)
    assert code == 2
    assert expect in error_line(code, err)
    assert no_loading == []


@pytest.mark.parametrize("clip, expect", [("not_video", "not a video"), ("short", "too short"), ("truncated", "truncated")])
def test_bad_videos_are_refused_before_the_model_loads(clip, expect, clips, tmp_path, capsys, no_loading):
    code, _, err = run(capsys, "generate", clips[clip], *FAST, "--out", tmp_path / "x.wav")
    assert code == 2 and expect in error_line(code, err)
    assert no_loading == []


def test_prompt_over_the_limit_is_one_line_with_the_counts(clips, tmp_path, capsys):
    code, _, err = run(capsys, "generate", clips["tiny"], *FAST, "--out", tmp_path / "x.wav", "--prompt", LONG_PROMPT)
    line = error_line(code, err)
    assert code == 2 and "CLAP accepts at most 128" in line and "shorten it" in line
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("magic, kind", [(b"\x89PNG\r\n\x1a\n" + bytes(40), "PNG"), (b"\xff\xd8\xff\xe0" + bytes(40), "JPEG")])
def test_an_image_is_not_a_video(magic, kind, tmp_path, capsys, no_loading):
    image = tmp_path / f"frame.{kind.lower()}"
    image.write_bytes(magic)
    code, _, err = run(capsys, "generate", image, *FAST, "--out", tmp_path / "x.wav")
    line = error_line(code, err)
    assert f"is a {kind} image, not a video" in line
    assert no_loading == []


def test_pixel_budget(clips):
    from foleyserve.media import MediaError
    from foleyserve.preflight import check_video

    with pytest.raises(MediaError, match=r"64x48"):
        check_video(clips["tiny"], max_pixels=100)
    assert check_video(clips["tiny"]).width == 64


def test_unreadable_video(clips, tmp_path, capsys, no_loading):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(clips["tiny"].read_bytes())
    locked.chmod(0)
    code, _, err = run(capsys, "generate", locked, *FAST, "--out", tmp_path / "x.wav")
    assert "not readable" in error_line(code, err)


# ------------------------------------------------------------------------------------ the demo


def test_demo_help_states_its_real_step_count(capsys):
    with pytest.raises(SystemExit):
        from foleyserve.cli import build_parser

        build_parser().parse_args(["demo", "--help"])
    assert f"(default {DEMO_STEPS})" in capsys.readouterr().out


def test_demo_says_its_precision_and_writes_a_sane_level(tmp_path, capsys):
    out = tmp_path / "demo.wav"
    code, _, err = run(capsys, "demo", "--out", out, "--steps", "2")
    assert code == 0, err
    precision, why = demo_precision("cpu")
    assert f"precision: {precision} ({why})" in err
    with av.open(str(out)) as f:
        audio = np.concatenate([frame.to_ndarray() for frame in f.decode(audio=0)], axis=-1)
    peak, rms = float(np.abs(audio).max()), float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    assert peak < 0.9 and float(np.mean(np.abs(audio) > 0.99)) == 0.0  # no clipping
    assert 10 ** (-35 / 20) < rms < 10 ** (-15 / 20)  # about -23 dBFS


def test_demo_precision_rule():
    assert demo_precision("cpu", cpu_flags={"avx2", "avx512f"})[0] == "fp32"
    assert demo_precision("cpu", cpu_flags={"avx512_bf16"}) == ("bf16", "this CPU has avx512_bf16")
    assert demo_precision("cpu", cpu_flags={"amx_bf16", "amx_tile"}) == ("bf16", "this CPU has amx_bf16")


# ------------------------------------------------------------------------- as a real process


@pytest.mark.parametrize(
    "case, expect",
    [("missing", "does not exist"), ("truncated", "truncated or corrupt"), ("empty-model-dir", HF_HINT)],
)
def test_subprocess_prints_one_line_without_traceback(case, expect, clips, tmp_path):
    out = tmp_path / "x.wav"
    argv = {
        "missing": ["generate", tmp_path / "nope.mp4", *FAST, "--out", out],
        "truncated": ["generate", clips["truncated"], *FAST, "--out", out],
        "empty-model-dir": ["generate", clips["tiny"], "--model-dir", tmp_path, "--device", "cpu", "--out", out],
    }[case]
    proc = subprocess.run(
        [sys.executable, "-m", "foleyserve", *map(str, argv)],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert expect in error_line(proc.returncode, proc.stderr)
    assert not out.exists()
