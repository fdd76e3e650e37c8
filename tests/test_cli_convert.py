import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from foleyserve.cli import main
from foleyserve.models.loading import read_checkpoint


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(8, generator=g),
        "decoder.model.1.block.1.weight_g": torch.randn(8, 1, 1, generator=g),
        "counter": torch.tensor([5, 6]),
    }


def read_back(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_plain_state_dict_round_trip(tmp_path, capsys):
    sd = state()
    src, dst = tmp_path / "model.pth", tmp_path / "model.safetensors"
    torch.save(sd, src)
    code, out, err = run(capsys, src, dst)
    assert code == 0 and err == ""
    assert "4 tensors" in out and str(dst) in out
    got, meta = read_back(dst)
    assert meta.get("config") is None
    assert got.keys() == sd.keys()
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k


def test_dac_layout_keeps_kwargs_as_config(tmp_path, capsys):
    kwargs = {"encoder_dim": 4, "encoder_rates": [2, 3, 4, 5, 8], "latent_dim": 128, "continuous": True}
    src, dst = tmp_path / "vae_128d_48k.pth", tmp_path / "vae.safetensors"
    torch.save({"state_dict": state(), "metadata": {"kwargs": kwargs}}, src)
    code, out, _ = run(capsys, src, dst)
    assert code == 0 and "config" in out
    got, meta = read_back(dst)
    assert json.loads(meta["config"]) == kwargs
    assert torch.equal(got["decoder.model.1.block.1.weight_g"], state()["decoder.model.1.block.1.weight_g"])
    sd, decoded = read_checkpoint(dst)
    assert decoded["config"] == kwargs and len(sd) == 4


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_dtype_flag_casts_floats_only(tmp_path, capsys, flag, dtype):
    src, dst = tmp_path / "m.pth", tmp_path / "m.safetensors"
    torch.save(state(), src)
    code, _, _ = run(capsys, src, dst, "--dtype", flag)
    assert code == 0
    got, _ = read_back(dst)
    assert got["blocks.0.bias"].dtype == dtype and got["blocks.0.weight"].dtype == dtype
    assert got["counter"].dtype == torch.int64
    assert torch.equal(got["blocks.0.bias"], state()["blocks.0.bias"].to(dtype))


def one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("foleyserve convert: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_missing_input(tmp_path, capsys):
    one_line_error(*run(capsys, tmp_path / "nope.pth", tmp_path / "o.safetensors"), "does not exist", "nope.pth")


def test_not_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "notes.pth"
    src.write_text("these are my notes, not weights\n")
    one_line_error(*run(capsys, src, tmp_path / "o.safetensors"), "not a PyTorch checkpoint")
    assert not (tmp_path / "o.safetensors").exists()


def test_input_is_a_directory(tmp_path, capsys):
    one_line_error(*run(capsys, tmp_path, tmp_path / "o.safetensors"), "is a directory")


def test_unwritable_outputs(tmp_path, capsys):
    src = tmp_path / "m.pth"
    torch.save(state(), src)
    one_line_error(*run(capsys, src, tmp_path / "no_such_dir" / "o.safetensors"), "does not exist", "create it")
    (tmp_path / "o.safetensors").mkdir()
    one_line_error(*run(capsys, src, tmp_path / "o.safetensors"), "is a directory")
    one_line_error(*run(capsys, src, tmp_path / "o.pth"), "must end in .safetensors")
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line_error(*run(capsys, src, ro / "o.safetensors"), "cannot write")
        finally:
            ro.chmod(0o700)


def test_write_failure_is_reported(tmp_path, capsys, monkeypatch):
    src = tmp_path / "m.pth"
    torch.save(state(), src)
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    one_line_error(*run(capsys, src, tmp_path / "o.safetensors"), "cannot write", "No space left on device")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src, dst = tmp_path / "m.pth", tmp_path / "m.safetensors"
    torch.save(state(), src)
    dst.write_bytes(b"keep me")
    one_line_error(*run(capsys, src, dst), "already exists", "--overwrite")
    assert dst.read_bytes() == b"keep me"
    assert run(capsys, src, dst, "--overwrite")[0] == 0
    assert read_back(dst)[0].keys() == state().keys()


def test_unsafe_pickle_needs_explicit_trust(tmp_path, capsys):
    src, dst = tmp_path / "vae.pth", tmp_path / "vae.safetensors"
    torch.save({"state_dict": state(), "metadata": {"kwargs": {"latent_dim": 128}, "step": np.int64(3)}}, src)
    one_line_error(*run(capsys, src, dst), "safe (weights-only) loader", "--trust-pickle")
    assert not dst.exists()
    code, _, _ = run(capsys, src, dst, "--trust-pickle")
    assert code == 0
    assert json.loads(read_back(dst)[1]["config"]) == {"latent_dim": 128}


def test_bad_arguments_return_usage_code(capsys):
    assert main(["convert"]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["convert", "a.pth", "b.safetensors", "--dtype", "int4"]) == 2
    assert main([]) == 2


def test_module_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "foleyserve", "convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "missing.pth does not exist" in proc.stderr
