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


def _readme_cli_block() -> dict[str, str]:
    """README's CLI block, the text of each `tdgen COMMAND` entry (continuation lines joined)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = text.split("## CLI", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        words = line.split()
        if words[:1] == ["tdgen"]:
            current = words[1] if not words[1].startswith("-") else ""
            entries[current] = entries.get(current, "") + " " + line
        elif current is not None:
            entries[current] += " " + line
    return entries


def test_readme_lists_every_flag_and_only_those():
    import re

    import typer

    root = typer.main.get_command(app)
    entries = _readme_cli_block()
    commands = {"": root, **root.commands}
    assert set(entries) == set(commands), set(entries) ^ set(commands)
    for name, cmd in commands.items():
        text = entries[name].split("#")[0]
        written = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", text))
        params = [p for p in cmd.params if p.opts and p.opts[0].startswith("-") and p.name != "help"]
        for p in params:
            names = set(p.opts) | set(p.secondary_opts)
            assert names & written, f"tdgen {name}: {p.opts[0]} exists but README does not list it"
        known = {o for p in params for o in (*p.opts, *p.secondary_opts)}
        assert written <= known, f"tdgen {name}: README lists {written - known}, which do not exist"


def test_doctor_prints_fix_commands_whole_in_a_pipe(tiny_model_dir):
    import torch

    r = runner.invoke(app, ["doctor", "--no-kernels", "--model", "nobody/not-cached"], terminal_width=80)
    fixes = [line.split("fix: ", 1)[1] for line in r.output.splitlines() if "fix: " in line]
    assert "hf download nobody/not-cached   (or pass --model PATH to a local diffusers folder)" in fixes
    if not torch.cuda.is_available():
        assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in fixes
    assert not any("…" in line for line in r.output.splitlines())


def test_json_help_says_what_each_command_prints():
    for cmd, words in (("presets", "each preset's changes"), ("doctor", "checks as a JSON list"), ("make", "outputs, timings")):
        r = runner.invoke(app, [cmd, "--help"], terminal_width=200)
        assert words in " ".join(r.output.split()), (cmd, r.output)


def test_mesh_takes_seed_and_negative_and_notes_when_unused(tmp_path):
    from test_pipeline import _two_colour_sphere

    from tdgen.gaussians import save_ply

    ply = tmp_path / "ball.ply"
    save_ply(_two_colour_sphere(n=1500), ply)
    r = runner.invoke(app, ["mesh", str(ply), "-o", str(tmp_path / "ball.glb"), "--preset", "smoke", "--device", "cpu",
                            "--seed", "7", "--negative", "blurry", "--set", "export.preview=false"])
    assert r.exit_code == 0, r.output
    assert "--negative only shape" in " ".join(r.output.split())
    cfg = (tmp_path / "ball.config.toml").read_text()
    assert "seed = 7" in cfg and 'negative_prompt = "blurry"' in cfg


def test_model_folder_settings_reach_the_run_and_bad_ones_stop_it(tmp_path):
    from test_pipeline import _two_colour_sphere

    from tdgen.gaussians import save_ply

    ply, model = tmp_path / "ball.ply", tmp_path / "model"
    model.mkdir()
    save_ply(_two_colour_sphere(n=1500), ply)
    (model / "tdgen.toml").write_text("[texture]\nrefine_guidance_scale = 12.5\n[stage1]\nguidance_scale = 20.0\n")
    args = ["mesh", str(ply), "-o", str(tmp_path / "ball.glb"), "--preset", "smoke", "--device", "cpu",
            "--model", str(model), "--set", "export.preview=false", "--set", "stage1.guidance_scale=30"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = (tmp_path / "ball.config.toml").read_text()
    assert "refine_guidance_scale = 12.5" in cfg and "guidance_scale = 30.0" in cfg  # --set wins
    (model / "tdgen.toml").write_text("[mesh]\ngrid = 64\n")
    out = tmp_path / "again.glb"
    r = runner.invoke(app, args[:3] + [str(out)] + args[4:])
    assert r.exit_code == 2, r.output
    assert "'mesh.grid' is not a model setting" in " ".join(r.output.split())
    assert not out.exists()


def test_readme_exit_code_table_covers_every_error():
    import re
    from pathlib import Path

    from tdgen import errors

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M))
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TdgenError)]
    assert {str(c.exit_code) for c in classes} | {"0", "130"} == set(table)
    assert "model missing" in table["3"] and "batch" in table["5"] and "before any work" in table["2"]
