import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from foleyserve.models.loading import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    compare_state_dict,
    load_file_into,
    load_into,
    peak_rss_bytes,
    read_checkpoint,
    read_state_dict,
    save_safetensors,
)


class Tiny(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def tiny_state(width: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "proj.weight": torch.randn(width, 3, generator=g),
        "proj.bias": torch.randn(width, generator=g),
        "norm.weight": torch.randn(width, generator=g),
        "norm.bias": torch.randn(width, generator=g),
        "steps": torch.tensor([3, 7]),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ reading


def test_safetensors_round_trip_with_config(tmp_path):
    sd = tiny_state()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps({"hidden": 4, "rates": [2, 3]}), "format": "pt"})
    got, meta = read_checkpoint(path)
    assert_same(got, sd)
    assert meta["config"] == {"hidden": 4, "rates": [2, 3]}
    assert meta["format"] == "pt"


def test_pth_round_trip_uses_safe_mmap_load(tmp_path, monkeypatch):
    sd = tiny_state()
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same(read_state_dict(path), sd)
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_legacy_pickle_falls_back_to_plain_load(tmp_path, monkeypatch):
    sd = tiny_state()
    path = tmp_path / "old.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert_same(read_state_dict(path), sd)
    assert calls[0]["mmap"] is False and calls[0]["weights_only"] is True


def test_safetensors_read_is_memory_mapped(tmp_path):
    # A tensor handed out by the mapping is backed by the file: loading it into a module with
    # dtype=None aliases it instead of copying.
    path = tmp_path / "w.safetensors"
    save_file(tiny_state(), str(path))
    sd = read_state_dict(path)
    model = Tiny()
    load_into(model, sd)
    assert model.proj.weight.data_ptr() == sd["proj.weight"].data_ptr()


def test_dac_layout_is_unwrapped(tmp_path):
    sd = tiny_state()
    kwargs = {"encoder_dim": 4, "latent_dim": 128, "decoder_rates": [8, 5, 4, 3, 2], "continuous": True}
    path = tmp_path / "vae.pth"
    torch.save({"state_dict": sd, "metadata": {"kwargs": kwargs}}, path)
    got, meta = read_checkpoint(path)
    assert_same(got, sd)
    assert meta["kwargs"] == kwargs
    assert meta["config"] == kwargs  # same access path as for safetensors
    assert_same(read_state_dict(path), sd)


def test_key_filter(tmp_path):
    sd = tiny_state()
    for name in ("w.pth", "w.safetensors"):
        path = tmp_path / name
        torch.save(sd, path) if name.endswith(".pth") else save_file(sd, str(path))
        got = read_state_dict(path, key_filter=lambda k: k.startswith("proj."))
        assert sorted(got) == ["proj.bias", "proj.weight"]


def test_unsafe_pickle_is_refused_with_reason(tmp_path):
    path = tmp_path / "vae.pth"
    torch.save({"state_dict": tiny_state(), "metadata": {"kwargs": {}, "loss": np.float64(0.5)}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert "numpy" in msg and "trust" in msg and "\n" not in msg
    got, meta = read_checkpoint(path, trust_pickle=True)
    assert_same(got, tiny_state())


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not a checkpoint", b"PK\x03\x04 not really a zip", b"\x80\x04K\x01."],
)
def test_garbage_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        read_state_dict(path)


def test_non_tensor_entries_and_missing_files(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": tiny_state(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_state_dict(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pth")


def test_reads_official_fixture(fixtures_dir):
    sd, meta = read_checkpoint(fixtures_dir / "tiny_dac_weights.safetensors")
    assert len(sd) == 298
    assert meta["config"]["decoder_rates"] == [8, 5, 4, 3, 2]


# ------------------------------------------------------------------------------------ loading


def test_strict_report_lists_every_problem_and_loads_nothing():
    sd = tiny_state()
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(5, 3)
    model = Tiny()
    before = model.proj.bias.detach().clone()
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(model, sd, source="w.pth")
    report = err.value.report
    assert report.missing == ["norm.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("proj.weight", (5, 3), (4, 3))]
    msg = str(err.value)
    for part in ("Tiny", "w.pth", "1 missing", "1 unexpected", "1 mis-shaped", "norm.bias", "extra.weight",
                 "proj.weight checkpoint [5, 3] vs module [4, 3]"):
        assert part in msg, part
    assert isinstance(err.value, RuntimeError)
    assert torch.equal(model.proj.bias, before)  # strict failure leaves the module untouched


def test_report_truncates_long_lists():
    report = compare_state_dict(Tiny(), {f"k{i}": torch.zeros(1) for i in range(20)})
    msg = report.describe(limit=3)
    assert "20 unexpected" in msg and "(+17 more)" in msg and "k19" not in msg


def test_non_strict_loads_what_fits():
    sd = tiny_state()
    del sd["norm.bias"]
    sd["proj.weight"] = torch.zeros(5, 3)
    model = Tiny()
    report = load_into(model, sd, strict=False)
    assert not report.ok and report.loaded == 3
    assert torch.equal(model.proj.bias, sd["proj.bias"])
    assert model.proj.weight.shape == (4, 3)


def test_meta_module_gets_real_tensors():
    with torch.device("meta"):
        model = Tiny()
    sd = tiny_state()
    report = load_into(model, sd)
    assert report.ok and report.loaded == 5
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cpu", name
        assert torch.equal(t, sd[name])
    assert isinstance(model.proj.weight, nn.Parameter) and model.proj.weight.requires_grad
    out = model.norm(model.proj(torch.ones(2, 3)))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_meta_leftovers_are_reported():
    class WithCache(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.zeros(3), persistent=False)

    with torch.device("meta"):
        model = WithCache()
    with pytest.raises(CheckpointMismatchError, match="meta device.*table"):
        load_into(model, tiny_state())
    report = load_into(model, tiny_state(), strict=False)
    assert report.left_on_meta == ["table"]


def test_dtype_on_load():
    sd = tiny_state()
    model = Tiny()
    load_into(model, sd, dtype=torch.bfloat16)
    assert model.proj.weight.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64  # integers are never cast
    assert torch.equal(model.proj.weight, sd["proj.weight"].to(torch.bfloat16))

    # dtype=None keeps what the file stores, whatever the module declared
    stored = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in sd.items()}
    with torch.device("meta"):
        model = Tiny()
    load_into(model, stored)
    assert model.proj.weight.dtype == torch.float16 and model.norm.weight.dtype == torch.float16

    # "module": each tensor takes the dtype the module declares (fp32 norm kept in a bf16 model)
    with torch.device("meta"):
        model = Tiny()
    model.proj.to(torch.bfloat16)
    load_into(model, sd, dtype="module")
    assert model.proj.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32


def test_load_file_into(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_state(), str(path), metadata={"config": "{\"width\": 4}"})
    with torch.device("meta"):
        model = Tiny()
    report, meta = load_file_into(model, path, dtype=torch.float64)
    assert report.ok and meta["config"] == {"width": 4}
    assert model.proj.weight.dtype == torch.float64
    with torch.device("meta"):
        wide = Tiny(width=6)
    with pytest.raises(CheckpointMismatchError, match="w.safetensors"):
        load_file_into(wide, path)


# ------------------------------------------------------------------------------------ writing


def test_save_safetensors_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.tensor([1, -2, 3]),
        "flag": torch.tensor([True, False]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "strided": base.t(),  # non-contiguous view
    }
    path = tmp_path / "out.safetensors"
    size = save_safetensors(path, tensors, metadata={"config": "{}"})
    assert size == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"config": "{}"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert_same(got, {k: v.contiguous() for k, v in tensors.items()})

    cast = tmp_path / "half.safetensors"
    save_safetensors(cast, tensors, dtype=torch.float16)
    got = read_state_dict(cast)
    assert got["f32"].dtype == torch.float16 and got["bf16"].dtype == torch.float16
    assert got["i64"].dtype == torch.int64 and got["flag"].dtype == torch.bool


def test_save_safetensors_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError):
        save_safetensors(path, {"a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        save_safetensors(path, {"a": torch.zeros(2)}, metadata={"n": 3})
    assert list(tmp_path.iterdir()) == []


def test_peak_rss_bytes():
    before = peak_rss_bytes()
    assert before > 10 * 2**20  # a Python process with torch loaded is well above 10 MiB
    assert peak_rss_bytes() >= before


def test_missing_keys_of_meta_module_are_not_double_counted():
    with torch.device("meta"):
        model = Tiny()
    sd = tiny_state()
    del sd["norm.bias"]
    report = load_into(model, sd, strict=False)
    assert report.missing == ["norm.bias"] and report.left_on_meta == ["norm.bias"]
    assert "1 missing" in report.describe() and "without data" not in report.describe()
