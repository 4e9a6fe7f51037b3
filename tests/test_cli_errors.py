"""Bad inputs and faults through the CLI, as a new user, a CI job or a careless script meets them.

Every case asserts the whole contract: the documented exit code, exactly one line on the terminal
(`error: …` naming the problem and the fix), no traceback, no temp or partial file, and the
previous asset in the output folder byte for byte as it was. CPU, the tiny model, tiny settings.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tdgen.io as tio
from tdgen.cli import app
from tdgen.errors import GenerationError

runner = CliRunner()
# Every stage runs, in about a second: --preset smoke cut to a 2-step splat and a bake-only texture.
TINY = ["--preset", "smoke", "--device", "cpu", "--set", "stage1.steps=2", "--set", "texture.refine_steps=0"]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prev_asset(tmp_path_factory, tiny_model_dir) -> Path:
    """A complete earlier asset (chair.glb, .ply, .preview.png, .config.toml), made once."""
    folder = tmp_path_factory.mktemp("prev")
    r = runner.invoke(app, ["make", "an earlier chair", "-o", str(folder / "chair.glb"), "--model", str(tiny_model_dir), *TINY])
    assert r.exit_code == 0, r.output
    assert {p.suffix for p in folder.iterdir()} == {".glb", ".ply", ".png", ".toml"}
    return folder


@pytest.fixture()
def asset(tmp_path, prev_asset) -> Path:
    """A copy of the earlier asset to run over; yields its folder."""
    folder = tmp_path / "assets"
    shutil.copytree(prev_asset, folder)
    return folder


def check(r, code: int, *fragments: str, folder: Path | None = None, before: dict | None = None,
          alone: bool = True) -> str:
    """The contract every case shares; returns the error line. `alone`: an error found before
    any work is the only line printed; one found mid-run follows the progress bars, last."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    assert [x for x in lines if x.startswith("error: ")] == lines[-1:], r.output
    if alone:
        assert len(lines) == 1, r.output
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    if folder is not None:
        assert not [p for p in folder.rglob("*") if p.name.startswith(tio.TEMP_PREFIX)]
        if before is not None:
            assert _hashes(folder) == before  # previous asset untouched, nothing new beside it
    return lines[-1]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: these errors must come before any heavy work."""
    import tdgen.guidance

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(tdgen.guidance, "load_model", boom)


def make(asset: Path, *args: str, model: Path | None = None, prompt: str = "a red chair"):
    extra = ["--model", str(model)] if model is not None else []
    return runner.invoke(app, ["make", prompt, "-o", str(asset / "chair.glb"), *extra, *TINY, *args])


# ---------------------------------------------------------------------------------------------
# Settings: one validation path, exit 2, before the model loads


CONFIG_FILES = {
    "nan": ("[stage1]\nguidance_scale = nan\n", "stage1.guidance_scale: expected a finite number, got nan"),
    "inf_height": ("[export]\nheight = inf\n", "export.height: expected a finite number, got inf"),
    "huge_grid": ("[mesh]\ngrid = 100000\n", "mesh.grid: 100000 is out of range; use a value from 16 to 512"),
    "string_for_int": ('[stage1]\nsteps = "many"\n', "expected an integer"),
    "unknown_key": ("[stage1]\nstepz = 3\n", "valid keys of [stage1]"),
    "unknown_section": ("[render]\nx = 1\n", "valid sections"),
    "bad_toml": ("[stage1\n", "not valid TOML"),
    "swapped_range": ("[stage1]\nt_min = 0.9\nt_max = 0.1\n", "must not exceed stage1.t_max"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_file(asset, tiny_model_dir, no_model_load, case):
    text, fragment = CONFIG_FILES[case]
    cfg = asset.parent / "bad.toml"
    cfg.write_text(text)
    before = _hashes(asset)
    check(make(asset, "--config", str(cfg), model=tiny_model_dir), 2, fragment, "bad.toml", folder=asset, before=before)


@pytest.mark.parametrize(
    "kind, fragment",
    [("binary", "is not UTF-8 text"), ("folder", "is a folder"), ("missing", "does not exist")],
)
def test_config_path_that_is_not_a_toml_file(asset, tiny_model_dir, no_model_load, kind, fragment):
    path = asset.parent / "cfg"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "folder":
        path.mkdir()
    before = _hashes(asset)
    check(make(asset, "--config", str(path), model=tiny_model_dir), 2, fragment, folder=asset, before=before)


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("mesh.grid=100000", "from 16 to 512 (memory grows with its cube)"),
        ("texture.size=65536", "from 16 to 8192"),
        ("stage1.num_points=100000000", "from 1 to 1000000"),
        ("stage1.steps=10000000", "from 1 to 100000"),
        ("stage1.batch_size=1000", "from 1 to 32"),
        ("stage1.resolution=100000", "from 16 to 2048"),
        ("texture.bake_resolution=1000000", "from 16 to 4096"),
        ("export.height=nan", "expected a finite number, got nan"),
        ("export.height=-inf", "expected a finite number, got -inf"),
        ("stage1.guidance_scale=1e309", "expected a finite number, got inf"),
        ("stage1.init_opacity=1", "an opacity of 0 or 1 is an infinite logit"),
        ("model.id=", "must not be empty"),
    ],
)
def test_bad_set_value(asset, tiny_model_dir, no_model_load, setting, fragment):
    before = _hashes(asset)
    check(make(asset, "--set", setting, model=tiny_model_dir), 2, "--set " + setting.split("=")[0], fragment,
          folder=asset, before=before)


@pytest.mark.parametrize("flag, value, fragment", [("--lods", "100", "from 0 to 8"), ("--seed", str(2**70), "64-bit")])
def test_bad_shortcut_option(asset, tiny_model_dir, no_model_load, flag, value, fragment):
    before = _hashes(asset)
    check(make(asset, flag, value, model=tiny_model_dir), 2, flag, fragment, folder=asset, before=before)


def test_manifest_nan_and_huge_grid_exit_2_before_any_asset(tmp_path, tiny_model_dir, no_model_load):
    out = tmp_path / "out"
    for body, fragment in (('set = { "stage1.guidance_scale" = nan }', "expected a finite number, got nan"),
                           ('set = { "mesh.grid" = 100000 }', "from 16 to 512")):
        m = tmp_path / "m.toml"
        m.write_text(f'[[asset]]\nname = "ok"\nprompt = "a cup"\n\n[[asset]]\nname = "bad"\nprompt = "a pot"\n{body}\n')
        r = runner.invoke(app, ["batch", str(m), "-o", str(out), "--set", f"model.id={tiny_model_dir}"])
        check(r, 2, "m.toml:5 (bad)", fragment)
        assert not out.exists()  # nothing made, not even the folder


# ---------------------------------------------------------------------------------------------
# Text


@pytest.mark.parametrize(
    "where, args, fragment",
    [
        ("prompt", [], "the prompt holds bytes that are not valid UTF-8 (at character 3)"),
        ("negative", ["--negative", "ugly \udcfe"], "--negative stage1.negative_prompt: holds bytes that are not valid UTF-8"),
        ("set", ["--set", "stage1.negative_prompt=\udcff"], "--set stage1.negative_prompt: holds bytes"),
    ],
)
def test_text_that_is_not_utf8(asset, tiny_model_dir, no_model_load, where, args, fragment):
    # Non-UTF-8 bytes in argv reach Python as lone surrogates (PEP 383): b"a \xff chair".
    prompt = "a \udcff chair" if where == "prompt" else "a chair"
    before = _hashes(asset)
    check(make(asset, *args, model=tiny_model_dir, prompt=prompt), 2, fragment, folder=asset, before=before)


def test_blank_prompt(asset, tiny_model_dir, no_model_load):
    before = _hashes(asset)
    check(make(asset, model=tiny_model_dir, prompt="   "), 2, "the prompt is empty", folder=asset, before=before)


def test_prompt_list_not_utf8(tmp_path, tiny_model_dir):
    src = tmp_path / "p.txt"
    src.write_bytes(b"chair: a chair\nlamp: a l\xe4mp\n")
    check(runner.invoke(app, ["batch", str(src), "-o", str(tmp_path / "out")]), 2, "p.txt:2: not valid UTF-8", "save the file as UTF-8")


# ---------------------------------------------------------------------------------------------
# Output folders: read-only, no permission, full


def _refuse_creates_in(monkeypatch, folder: Path, code: int) -> None:
    """Simulate a read-only mount / a folder without write permission. Tests run as root, which
    chmod cannot stop, so the create itself is refused, as the kernel would."""
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        if flags & os.O_CREAT and Path(path).parent.resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("code, fragment", [(errno.EROFS, "read-only"), (errno.EACCES, "fix the folder's permissions")])
def test_unwritable_output_folder_for_make(asset, tiny_model_dir, no_model_load, monkeypatch, code, fragment):
    before = _hashes(asset)
    _refuse_creates_in(monkeypatch, asset, code)
    check(make(asset, model=tiny_model_dir), 2, f"cannot write to the output folder {asset}", fragment,
          folder=asset, before=before)


def test_unwritable_output_folder_for_mesh(asset, monkeypatch):
    before = _hashes(asset)
    _refuse_creates_in(monkeypatch, asset, errno.EROFS)
    r = runner.invoke(app, ["mesh", str(asset / "chair.ply"), "-o", str(asset / "chair.glb"), *TINY])
    check(r, 2, "cannot write to the output folder", "read-only", folder=asset, before=before)


def test_unwritable_output_folder_for_batch_is_one_upfront_error(tmp_path, monkeypatch):
    import tdgen.batch.runners as R

    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "p.txt"
    src.write_text("chair: a chair\nlamp: a lamp\n")
    started = []
    monkeypatch.setattr(R, "_default_load_model", lambda *a: started.append(a))
    _refuse_creates_in(monkeypatch, out, errno.EROFS)
    check(runner.invoke(app, ["batch", str(src), "-o", str(out)]), 2, f"cannot write to the output folder {out}", "read-only")
    assert started == [] and list(out.iterdir()) == []


def _fail_writes_of(monkeypatch, suffix: str, code: int = errno.ENOSPC) -> None:
    """The disk fills up while the temp file of an output ending in `suffix` is being written."""
    real_fsync = os.fsync

    def fake_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fake_fsync)


@pytest.mark.parametrize("suffix", [".ply", ".glb", ".png", ".toml"])
def test_disk_full_while_writing_keeps_the_previous_asset(asset, tiny_model_dir, monkeypatch, suffix):
    before = _hashes(asset)
    _fail_writes_of(monkeypatch, suffix)
    line = check(make(asset, model=tiny_model_dir), 1, "No space left on device", "free some disk space",
                 folder=asset, before=before, alone=False)
    assert f"chair{'.preview' if suffix == '.png' else '.config' if suffix == '.toml' else ''}{suffix}" in line


# ---------------------------------------------------------------------------------------------
# Failures mid-run: the previous asset stays whole


def test_failing_stage2_over_an_existing_asset_keeps_ply_and_glb(asset, tiny_model_dir, monkeypatch):
    import tdgen.mesh

    def no_surface(*a, **k):
        raise GenerationError("no surface found; lower mesh.threshold")

    monkeypatch.setattr(tdgen.mesh, "extract_mesh", no_surface)
    before = _hashes(asset)
    check(make(asset, model=tiny_model_dir), 1, "no surface found", folder=asset, before=before, alone=False)


def test_ctrl_c_in_stage2_keeps_the_previous_asset(asset, tiny_model_dir, monkeypatch):
    import tdgen.unwrap

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tdgen.unwrap, "unwrap_mesh", interrupted)
    before = _hashes(asset)
    r = make(asset, model=tiny_model_dir)
    assert r.exit_code == 130 and "interrupted" in r.output and "Traceback" not in r.output
    assert _hashes(asset) == before and not list(asset.glob(tio.TEMP_PREFIX + "*"))


def test_rerun_after_a_failure_replaces_every_file(asset, tiny_model_dir):
    before = _hashes(asset)
    r = make(asset, "--seed", "5", "--lods", "1", model=tiny_model_dir)
    assert r.exit_code == 0, r.output
    after = _hashes(asset)
    assert {"chair.glb", "chair.ply", "chair.preview.png", "chair.config.toml", "chair_lod1.glb"} == set(after)
    assert all(after[k] != before[k] for k in before)  # all from the new run, none left over
    # and fewer LODs next time: the stale chair_lod1.glb goes with the commit
    assert make(asset, model=tiny_model_dir).exit_code == 0
    assert not (asset / "chair_lod1.glb").exists()


def test_unexpected_error_is_one_line_unless_debug(asset, tiny_model_dir, monkeypatch):
    import tdgen.texture

    def bug(*a, **k):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(tdgen.texture, "bake_texture", bug)
    before = _hashes(asset)
    check(make(asset, model=tiny_model_dir), 1, "unexpected ValueError: operands could not be broadcast",
          "--debug", folder=asset, before=before, alone=False)
    r = runner.invoke(app, ["--debug", "make", "a chair", "-o", str(asset / "chair.glb"), "--model", str(tiny_model_dir), *TINY])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)  # the traceback is the user's to see
    monkeypatch.setenv("TDGEN_DEBUG", "1")
    r = make(asset, model=tiny_model_dir)
    assert isinstance(r.exception, ValueError)
    assert _hashes(asset) == before


def test_out_of_memory_is_one_line_with_the_fix(asset, tiny_model_dir, monkeypatch):
    import tdgen.mesh

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000000 bytes. Error code 12 (Cannot allocate memory)\nmore")

    def oom2(*a, **k):
        raise MemoryError()

    before = _hashes(asset)
    for fn in (oom, oom2):
        monkeypatch.setattr(tdgen.mesh, "extract_mesh", fn)
        check(make(asset, model=tiny_model_dir), 1, "out of memory", "--preset draft", folder=asset,
              before=before, alone=False)


# ---------------------------------------------------------------------------------------------
# Model folders: exit 3, the file named


def _broken_copy(tiny_model_dir: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    m = tmp_path / "model"
    shutil.copytree(tiny_model_dir, m)
    if how == "truncated_unet":
        w = m / "unet" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return m, "unet/diffusion_pytorch_model.safetensors is truncated"
    if how == "garbage_vae":
        (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"x" * 64)
        return m, "vae/diffusion_pytorch_model.safetensors has a header length beyond the end"
    if how == "bad_unet_config":
        (m / "unet" / "config.json").write_text('{"sample_size": 8,')
        return m, "unet/config.json is not valid JSON at line 1"
    if how == "bad_vocab":
        (m / "tokenizer" / "vocab.json").write_text("[1, 2")
        return m, "tokenizer/vocab.json is not valid JSON"
    if how == "wrong_shapes":
        cfg = json.loads((m / "vae" / "config.json").read_text())
        cfg["block_out_channels"] = [4, 8, 8, 8]
        (m / "vae" / "config.json").write_text(json.dumps(cfg))
        return m, "vae/ could not be loaded"
    if how == "no_unet":
        shutil.rmtree(m / "unet")
        return m, "has no unet/ subfolder"
    if how == "pickles":
        for p in m.rglob("*.safetensors"):
            p.rename(p.with_suffix(".bin"))
        return m, "refusing pickled weights"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated_unet", "garbage_vae", "bad_unet_config", "bad_vocab", "wrong_shapes", "no_unet", "pickles"])
def test_broken_model_folder_exit_3_names_the_file(asset, tiny_model_dir, tmp_path, how):
    model, fragment = _broken_copy(tiny_model_dir, tmp_path, how)
    before = _hashes(asset)
    check(make(asset, model=model), 3, fragment, folder=asset, before=before)


@pytest.mark.parametrize("model", ["/nonexistent", "nobody/no-such-model"])
def test_missing_model_is_exactly_one_line(asset, monkeypatch, tmp_path, model):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = _hashes(asset)
    # check() holds it to one line: no CPU note, no empty progress bar before the error
    check(make(asset, "--model", model), 3, model, "--model PATH", folder=asset, before=before)


# ---------------------------------------------------------------------------------------------
# Splat files for `tdgen mesh`


def _ply(props: list[str], rows: int = 4, data: bytes | None = None) -> bytes:
    head = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {rows}\n"
    head += "".join(f"property float {p}\n" for p in props) + "end_header\n"
    return head.encode() + (data if data is not None else b"\0" * 4 * len(props) * rows)


INRIA = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
         "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


@pytest.mark.parametrize(
    "case, content, fragment",
    [
        ("duplicated", _ply(INRIA + ["x"]), "has the vertex property 'x' more than once"),
        ("truncated", _ply(INRIA, data=b"\0" * 10), "is truncated"),
        ("nan", _ply(INRIA, rows=1, data=struct.pack("<17f", float("nan"), *[0.0] * 16)), "NaN or infinite"),
        ("missing_prop", _ply(INRIA[1:]), "missing the vertex property 'x'"),
        ("not_ply", b"\x89PNG\r\n", "is not a PLY file"),
        ("missing_file", None, "file not found"),
    ],
)
def test_bad_splat_for_mesh(asset, tmp_path, case, content, fragment):
    ply = tmp_path / f"{case}.ply"
    if content is not None:
        ply.write_bytes(content)
    before = _hashes(asset)
    r = runner.invoke(app, ["mesh", str(ply), "-o", str(asset / "chair.glb"), *TINY])
    check(r, 2, f"{case}.ply", fragment, folder=asset, before=before)


# ---------------------------------------------------------------------------------------------
# Output paths and devices


@pytest.mark.parametrize(
    "out, fragment",
    [("chair.fbx", "must end in .glb or .ply"), ("dir.glb", "is a folder"), ("chair.glb/x.glb", "is not a folder")],
)
def test_bad_output_path(asset, tiny_model_dir, no_model_load, out, fragment):
    if out == "dir.glb":
        (asset / out).mkdir()
    before = _hashes(asset)
    r = runner.invoke(app, ["make", "a chair", "-o", str(asset / out), "--model", str(tiny_model_dir), *TINY])
    check(r, 2, fragment, folder=asset, before=before)


@pytest.mark.parametrize("device, fragment", [("cuda", "--device cpu"), ("tpu", "use auto, cuda or cpu")])
def test_unusable_device_exit_4(asset, tiny_model_dir, no_model_load, device, fragment):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = _hashes(asset)
    r = runner.invoke(app, ["make", "a chair", "-o", str(asset / "chair.glb"), "--model", str(tiny_model_dir),
                            *TINY[:2], "--device", device])
    check(r, 4, fragment, folder=asset, before=before)


def test_reader_closing_the_pipe_is_not_an_error():
    """`tdgen presets --show quality | head -1`: quiet, exit 0, no BrokenPipeError."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    p = subprocess.Popen([sys.executable, "-m", "tdgen.cli", "presets", "--show", "quality"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         bufsize=0)
    assert p.stdout.read(20)
    p.stdout.close()  # before the ~10 kB of output are written: the next write hits a closed pipe
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and stderr == "", stderr
