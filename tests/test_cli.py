import json

import pytest
from typer.testing import CliRunner

from tdgen import __version__
from tdgen.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout


def test_presets_list_and_show():
    r = runner.invoke(app, ["presets", "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert set(data) == {"draft", "standard", "quality", "smoke"}
    assert data["draft"]["mesh.triangles"] == 5000
    r = runner.invoke(app, ["presets", "--show", "draft"])
    assert r.exit_code == 0
    assert "triangles = 5000  #*" in r.stdout  # changed by the preset, and marked
    assert "SDS iterations" in r.stdout  # field docstrings are shown


def test_unknown_preset_exit_2():
    r = runner.invoke(app, ["presets", "--show", "ultra"])
    assert r.exit_code == 2
    assert "valid presets" in r.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "stage1.nokey=1"], "valid keys of [stage1]"),
        (["--set", "render.x=1"], "valid sections"),
        (["--set", "stage1.steps=lots"], "expected an integer"),
        (["--preset", "ultra"], "valid presets"),
    ],
)
def test_make_config_errors_exit_2_without_output(tmp_path, args, fragment):
    out = tmp_path / "a.glb"
    r = runner.invoke(app, ["make", "a chair", "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    assert fragment in r.output
    assert "Traceback" not in r.output
    assert not list(tmp_path.iterdir())


def test_make_rejects_bad_output_suffix(tmp_path):
    r = runner.invoke(app, ["make", "a chair", "-o", str(tmp_path / "a.fbx")])
    assert r.exit_code == 2
    assert ".glb" in r.output


def test_make_missing_model_offline_exit_3(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = tmp_path / "a.glb"
    r = runner.invoke(app, ["make", "a chair", "-o", str(out), "--model", "nobody/no-such-model", "--device", "cpu"])
    assert r.exit_code == 3, r.output
    assert "nobody/no-such-model" in r.output
    assert "hf download" in r.output and "--model" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_make_missing_local_folder_exit_3(tmp_path):
    r = runner.invoke(app, ["make", "a chair", "-o", str(tmp_path / "a.glb"), "--model", str(tmp_path / "nope")])
    assert r.exit_code == 3, r.output


def test_device_cuda_without_gpu_exit_4(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = runner.invoke(app, ["make", "a chair", "-o", str(tmp_path / "a.glb"), "--model", str(tiny_model_dir), "--device", "cuda"])
    assert r.exit_code == 4
    assert "--device cpu" in r.output


def test_mesh_bad_ply_exit_2(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"not a ply at all")
    out = tmp_path / "o.glb"
    r = runner.invoke(app, ["mesh", str(bad), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "bad.ply" in r.output
    assert not out.exists()


def test_doctor_runs_without_kernels(tmp_path, monkeypatch, tiny_model_dir):
    r = runner.invoke(app, ["doctor", "--no-kernels", "--json", "--model", str(tiny_model_dir)])
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["model"]["status"] == "ok"
    assert "cuda" in checks and "gsplat" in checks
    missing = runner.invoke(app, ["doctor", "--no-kernels", "--json", "--model", str(tmp_path)])
    assert missing.exit_code == 1
    assert any(c["status"] == "fail" and c["fix"] for c in json.loads(missing.stdout))
