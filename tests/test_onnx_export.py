"""ONNX export of the demo model's DAC decoder: parity at unseen lengths, manifest, torch-free loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from foleyserve.export.manifest import (  # noqa: E402
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    read_manifest,
    sha256_state_dict,
    write_manifest,
)
from foleyserve.export.onnx_export import DAC_EXPORT_LATENT_LEN, DAC_STAGE, export_demo  # noqa: E402
from foleyserve.export.ort_runtime import load_stage, rel_l2  # noqa: E402
from foleyserve.pipeline.demo import demo_components  # noqa: E402

TOL = 1e-5  # issue 11: ORT CPU fp32 vs torch fp32, per stage
# Neither is the export length (DAC_EXPORT_LATENT_LEN) nor one the export measured parity at.
CHECK_SHAPES = [(1, 5), (2, 29)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_export")
    manifest = export_demo(out)
    dac = demo_components(torch.device("cpu")).dac
    return out, manifest, dac


def test_export_records_dynamic_axes_and_parity(exported):
    _, manifest, dac = exported
    entry = manifest.stages[DAC_STAGE]
    (z_spec,), (audio_spec,) = entry.inputs, entry.outputs
    assert (z_spec.name, z_spec.dtype) == ("z", "float32")
    assert isinstance(z_spec.shape[0], str) and z_spec.shape[1] == dac.latent_dim and isinstance(z_spec.shape[2], str)
    assert isinstance(audio_spec.shape[2], str)  # the sample count follows the latent length
    assert entry.opset >= 17 and entry.exporter == "dynamo"
    assert entry.source_hashes == {"state_dict": sha256_state_dict(dac.state_dict())}
    assert entry.parity and all(v <= TOL for v in entry.parity.values()), entry.parity
    assert not any(k.endswith(f"x{DAC_EXPORT_LATENT_LEN}") for k in entry.parity)


@pytest.mark.parametrize("batch,length", CHECK_SHAPES)
def test_ort_matches_torch_at_other_lengths(exported, batch, length):
    out, _, dac = exported
    assert length != DAC_EXPORT_LATENT_LEN
    z = torch.randn(batch, dac.latent_dim, length, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = dac.decode(z).numpy()
    got = load_stage(out, DAC_STAGE).run(z=z.numpy())["audio"]
    assert got.shape == (batch, 1, length * dac.hop_length)
    assert rel_l2(got, ref) <= TOL


def test_manifest_round_trip(exported, tmp_path):
    out, manifest, _ = exported
    assert read_manifest(out) == manifest
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    data = json.loads(manifest.to_json())
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ManifestError, match="format_version"):
        Manifest.from_dict(data)
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_runtime_refuses_tampered_graph_and_bad_inputs(exported, tmp_path):
    out, _, dac = exported
    runtime = load_stage(out, DAC_STAGE)
    with pytest.raises(TypeError, match="float32"):
        runtime.run(z=np.zeros((1, dac.latent_dim, 4), dtype=np.float64))
    with pytest.raises(ValueError, match="axis 1"):
        runtime.run(z=np.zeros((1, dac.latent_dim + 1, 4), dtype=np.float32))
    with pytest.raises(ManifestError, match="not in"):
        load_stage(out, "dit_step")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / f"{DAC_STAGE}.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        load_stage(copy, DAC_STAGE)


def test_loads_in_fresh_process_without_model_code(exported, tmp_path):
    out, _, dac = exported
    z = torch.randn(1, dac.latent_dim, 11, generator=torch.Generator().manual_seed(11))
    np.save(tmp_path / "z.npy", z.numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from foleyserve.export.ort_runtime import load_stage
        audio = load_stage({str(out)!r}, {DAC_STAGE!r}).run(z=np.load({str(tmp_path / 'z.npy')!r}))["audio"]
        np.save({str(tmp_path / 'audio.npy')!r}, audio)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "foleyserve.models", "foleyserve.pipeline", "foleyserve.export.onnx_export")))
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        ref = dac.decode(z).numpy()
    assert rel_l2(np.load(tmp_path / "audio.npy"), ref) <= TOL


def test_torchscript_exporter_also_meets_parity(exported, tmp_path):
    # The fallback for models torch.export cannot capture; kept working so switching is one argument.
    from foleyserve.export.onnx_export import export_dac_decoder

    _, _, dac = exported
    entry = export_dac_decoder(dac, tmp_path, source="demo", source_hashes={}, exporter="torchscript")
    assert entry.exporter == "torchscript"
    assert entry.parity and all(v <= TOL for v in entry.parity.values()), entry.parity
