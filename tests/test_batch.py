"""tdgen.batch: parsers, incremental reruns, failure isolation, interruption, workers, the CLI.

Most tests use `fake_generate`, a stand-in for `pipeline.generate` that writes a small valid .glb
(and preview/config) through the same atomic writes in milliseconds. It and `fake_load_model` are
top-level so spawned worker processes and Ray actors can import them by reference.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdgen import batch as B
from tdgen.batch import runners as R
from tdgen.batch import specs as S
from tdgen.config import dump_toml
from tdgen.errors import BatchError, ConfigError, InputError
from tdgen.io import TEMP_PREFIX, atomic_path, atomic_write_bytes, atomic_write_text, pending_path, sha256_file
from tdgen.progress import Progress

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
FAST = {"stage1.steps": 2, "texture.size": 16}  # keeps configs cheap-looking; the fake ignores them

# --------------------------------------------------------------------------------------------
# Stand-ins (module level: picklable by reference for spawn workers and Ray actors)

_LOADS = 0
_GLB: bytes | None = None


def _box_glb() -> bytes:
    global _GLB
    if _GLB is None:
        import trimesh

        _GLB = trimesh.creation.box().export(file_type="glb")
    return _GLB


def fake_load_model(mc, device):
    global _LOADS
    _LOADS += 1
    return SimpleNamespace(source={"id": mc.id, "revision": "fake-commit"}, device=device)


def fake_generate(prompt, cfg, out, *, device="auto", model=None, on_progress=lambda p: None):
    if "FAIL" in prompt:
        raise RuntimeError("stand-in failure\nsecond line that must not reach the summary")
    if "OOM" in prompt:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    out = Path(out)
    for step in range(3):
        on_progress(Progress("stage1", step, 3, loss=0.5))
    data = _box_glb()
    with atomic_path(out) as tmp:
        if os.environ.get("TDGEN_TEST_HANG") == out.stem:
            # Simulates a slow export: half a file in the temp, then a kill arrives.
            tmp.write_bytes(data[: len(data) // 2])
            Path(os.environ["TDGEN_TEST_HANG_READY"]).write_text("ready")
            time.sleep(120)
        if os.environ.get("TDGEN_TEST_INTERRUPT") == out.stem:
            tmp.write_bytes(data[:10])
            raise KeyboardInterrupt
        tmp.write_bytes(data)
    preview = out.with_name(out.stem + ".preview.png")
    atomic_write_bytes(preview, f"png of {prompt} seed {cfg.seed}".encode())
    cfg_path = out.with_name(out.stem + ".config.toml")
    atomic_write_text(cfg_path, dump_toml(cfg))
    on_progress(Progress("export", 1, 1))
    counts = {"loads": _LOADS, "pid": os.getpid()}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        counts["cvd"] = int(os.environ["CUDA_VISIBLE_DEVICES"] or -1)
    # GenerateResult's fields without importing pipeline (and torch) into every worker process
    return SimpleNamespace(
        outputs={"glb": out, "preview": preview, "config": cfg_path},
        timings={"total": 0.01},
        counts=counts,
        sha256=sha256_file(pending_path(out)),  # inside the asset's staged set: not renamed yet
    )


@pytest.fixture()
def fakes(monkeypatch):
    """Route the default generate/load_model (what the CLI uses) to the stand-ins; count calls."""
    calls: list[str] = []

    def gen(prompt, cfg, out, **kw):
        calls.append(Path(out).stem)
        return fake_generate(prompt, cfg, out, **kw)

    monkeypatch.setattr(R, "_default_generate", gen)
    monkeypatch.setattr(R, "_default_load_model", fake_load_model)
    return calls


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def plan(path: Path, **kw) -> list[B.Asset]:
    return B.plan_assets(B.load_batch_file(path), sets={**FAST, **kw.pop("sets", {})}, **kw)


def assert_valid_glb(path: Path) -> None:
    import trimesh

    scene = trimesh.load(path, file_type="glb")
    assert len(scene.geometry) >= 1
    assert path.read_bytes()[:4] == b"glTF"


def no_temps(folder: Path) -> bool:
    return not any(p.name.startswith(TEMP_PREFIX) for p in folder.rglob("*"))


THREE = """
# three props
chair: a red wooden chair
barrel: a medieval barrel

a glass potion bottle
"""


# --------------------------------------------------------------------------------------------
# Prompt list parser


def test_prompt_list_rules():
    specs = B.parse_prompt_list(
        textwrap.dedent(
            """\
            # comment
               # indented comment

            chair: a red chair
            Warhammer: a space marine
            marine: Sci-fi: a helmet
            12:30 clock on a wall
            a sign saying "open: 24h"
            see http://example.com for a lamp
            two words: not a name
            a red #1 racing car
            emptyname:\tx
            """
        ),
        "list.txt",
    )
    got = [(s.name, s.prompt, s.where) for s in specs]
    assert got == [
        ("chair", "a red chair", "list.txt:4"),
        ("warhammer", "a space marine", "list.txt:5"),
        ("marine", "Sci-fi: a helmet", "list.txt:6"),
        ("12_30_clock_on_a_wall", "12:30 clock on a wall", "list.txt:7"),
        ("a_sign_saying_open_24h", 'a sign saying "open: 24h"', "list.txt:8"),
        ("see_http_example_com_for_a_lamp", "see http://example.com for a lamp", "list.txt:9"),
        ("two_words_not_a_name", "two words: not a name", "list.txt:10"),
        ("a_red_1_racing_car", "a red #1 racing car", "list.txt:11"),
        ("emptyname", "x", "list.txt:12"),
    ]


def test_slugify_bounds_and_unicode():
    assert B.slugify("Café au lait, 2 cups!") == "cafe_au_lait_2_cups"
    assert B.slugify("!!!") == "asset"
    assert B.slugify("nul") == "nul_"
    long = B.slugify("word " * 40)
    assert len(long) <= B.NAME_MAX and not long.endswith("_") and B.SAFE_NAME.match(long)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("ok prompt\nrobot:\n", 2, "no prompt after the colon"),
        ("a\n\n# c\nRobot: one\nb\nrobot: two\n", 6, "duplicate asset name 'robot'"),
        ("# only comments\n\n", None, "no prompts found"),
        ("x" * 3 + "\ncon: a console\n", 2, "reserved"),
        ("fine\n" + "n" * 70 + ": too long a name\n", 2, "longer than"),
    ],
)
def test_prompt_list_errors_name_the_line(text, line, fragment):
    with pytest.raises(InputError) as ei:
        B.parse_prompt_list(text, "p.txt")
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg
    if line is not None:
        assert f"p.txt:{line}" in msg


def test_duplicates_name_both_lines(tmp_path):
    f = write(tmp_path / "p.txt", "Robot: one\nchair: a chair\nrobot: two\n")
    with pytest.raises(InputError, match=r"p\.txt:1 and .*p\.txt:3"):
        B.load_batch_file(f)
    # two unnamed prompts that slugify alike also collide
    with pytest.raises(InputError, match=r":1 and .*:2"):
        B.parse_prompt_list("a red chair\nA red chair!\n")


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"one\ntwo\nthr\xff\xfeee\n")
    with pytest.raises(InputError, match=r"p\.txt:3: not valid UTF-8"):
        B.load_batch_file(f)


def test_lod_name_clash_is_an_error():
    with pytest.raises(InputError, match="LOD"):
        B.parse_prompt_list("rock: a rock\nrock_lod1: another rock\n")


# hypothesis: names are the only thing allowed to become file names, so check them hardest

_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", fullmatch=True).filter(
    lambda n: n.lower() not in S._RESERVED and not S._LOD_NAME.match(n.lower())
)
_prompt = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
).map(str.strip).filter(lambda p: p and not p.startswith("#"))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), _name), _prompt), min_size=1, max_size=8), st.data())
def test_prompt_list_round_trip(items, data):
    # unnamed entries only where the prompt cannot be read as `name: …`; names unique ignoring case
    expected, seen, lines = [], set(), []
    for name, prompt in items:
        if name is None and S._NAMED_LINE.match(prompt):
            continue
        final = name.lower() if name else B.slugify(prompt)
        if final in seen or S._LOD_NAME.match(final):
            continue
        seen.add(final)
        expected.append((final, prompt))
        lines += data.draw(st.sampled_from([[], [""], ["# a comment: with colon"], ["   "]]))
        if name is None:
            lines.append(prompt)
        else:
            lines.append(f"{name}: {prompt}" if data.draw(st.booleans()) else f"  {name}:\t{prompt}  ")
    if not expected or any(S._LOD_NAME.match(n) and S._LOD_NAME.match(n).group(1) in seen for n in seen):
        return
    specs = B.parse_prompt_list("\n".join(lines) + data.draw(st.sampled_from(["", "\n", "\r\n"])))
    assert [(s.name, s.prompt) for s in specs] == expected
    for s in specs:
        assert s.prompt in lines[int(s.where.rsplit(":", 1)[1]) - 1]
        assert B.SAFE_NAME.match(s.name)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_prompt_list_names_always_safe(text):
    try:
        specs = B.parse_prompt_list(text)
    except InputError as e:
        assert "\n" not in str(e)
        return
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    for s in specs:
        assert B.SAFE_NAME.match(s.name), s.name
        assert s.prompt and s.prompt == s.prompt.strip()


# --------------------------------------------------------------------------------------------
# Manifest parser


MANIFEST = """
preset = "draft"
negative = "blurry"
seed = 7

[set]
"export.height" = 2.0
"stage1.steps" = 3

[[asset]]
name = "door"
prompt = "an oak door"
set = { "export.height" = 2.5 }

[[asset]]
prompt = "a wall torch"
negative = "cartoon"
seed = 42
preset = "quality"
set = { stage1 = { steps = 4 } }
"""


def test_manifest_defaults_and_precedence(tmp_path):
    f = write(tmp_path / "m.toml", MANIFEST)
    door, torch_ = B.plan_assets(B.load_batch_file(f))
    assert (door.name, door.where) == ("door", f"{f}:9")
    assert (torch_.name, torch_.where) == ("a_wall_torch", f"{f}:14")
    assert door.cfg.export.height == 2.5 and door.cfg.stage1.steps == 3
    assert door.cfg.stage1.negative_prompt == "blurry"
    assert door.cfg.texture.size == 512  # draft preset
    assert door.cfg.seed == B.stable_seed("door", 7) != B.stable_seed("door", 0)
    assert torch_.cfg.stage1.steps == 4 and torch_.cfg.export.height == 2.0
    assert torch_.cfg.texture.size == 2048 and torch_.cfg.seed == 42  # quality preset, own seed
    assert torch_.cfg.stage1.negative_prompt == "cartoon"
    # the command line wins over the file
    door2, torch2 = B.plan_assets(B.load_batch_file(f), preset="standard", sets={"stage1.steps": 9}, negative="")
    assert door2.cfg.texture.size == torch2.cfg.texture.size == 1024
    assert door2.cfg.stage1.steps == torch2.cfg.stage1.steps == 9
    assert torch2.cfg.stage1.negative_prompt == ""
    assert door2.inputs_sha256 != door.inputs_sha256


@pytest.mark.parametrize(
    "text, exc, pattern",
    [
        ('[[asset]]\nprompt = "a"\ncolour = "red"\n', InputError, r"m\.toml:3: unknown key 'colour'.*valid keys"),
        ('[[asset]]\nprompt = "a"\n[asset.sets]\nx = 1\n', InputError, r"m\.toml:3: unknown key 'sets'"),
        ('seed = 1\npresets = "draft"\n[[asset]]\nprompt = "a"\n', InputError, r"m\.toml:2: unknown top-level key 'presets'"),
        ('[sets]\nx = 1\n[[asset]]\nprompt = "a"\n', InputError, r"m\.toml:1: unknown top-level key 'sets'"),
        ('seed = "one"\n[[asset]]\nprompt = "a"\n', InputError, r"m\.toml:1: `seed` must be an integer"),
        ('asset = [{ prompt = "a", color = 1 }]\n', InputError, r"m\.toml \(asset #1\): unknown key 'color'"),
        ('[[asset]]\nprompt = "a"\n\n[[asset]]\nname = "b"\n', InputError, r"m\.toml:4: .*no prompt"),
        ('[[asset]]\nprompt = "a"\nseed = "x"\n', InputError, r"m\.toml:1: `seed` must be an integer"),
        ('[[asset]]\nprompt = "a"\nname = "my door"\n', InputError, r"not a safe file name.*'my_door'"),
        ('[[asset]]\nprompt = "a"\n\n[[asset]]\nprompt = "b"\npreset = "ultra"\n', ConfigError, r"m\.toml:4 \(b\): unknown preset 'ultra'"),
        ('[[asset]]\nprompt = "a"\nset = { "stage1.stepz" = 3 }\n', ConfigError, r"m\.toml:1 \(a\):.*unknown key 'stage1.stepz'"),
        ('[[asset]]\nprompt = "a"\nset = { "stage1.steps" = "many" }\n', ConfigError, r"m\.toml:1.*expected an integer"),
        ('[[asset]]\nprompt = "a"\nname = "x"\n[[asset]]\nprompt = "b"\nname = "X"\n', InputError, r"m\.toml:1 and .*m\.toml:4"),
        ('[[asset]]\nprompt = "a\n', InputError, r"m\.toml:2: not valid TOML"),
        ('preset = "draft"\n', InputError, r"no assets found"),
    ],
)
def test_manifest_errors(tmp_path, text, exc, pattern):
    f = write(tmp_path / "m.toml", text)
    with pytest.raises(exc) as ei:
        B.plan_assets(B.load_batch_file(f))
    assert re.search(pattern, str(ei.value)), str(ei.value)
    assert "\n" not in str(ei.value)


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # escapes only what TOML also escapes (for Cc-free text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), _name), _prompt, st.one_of(st.none(), st.integers(0, 2**31 - 1))),
        min_size=1,
        max_size=6,
    )
)
def test_manifest_round_trip(items):
    body = []
    for name, prompt, seed in items:
        body.append("[[asset]]")
        if name is not None:
            body.append(f"name = {_toml_str(name)}")
        body.append(f"prompt = {_toml_str(prompt)}")
        if seed is not None:
            body.append(f"seed = {seed}")
        body.append("")
    try:
        specs = B.parse_manifest("\n".join(body), "m.toml")
    except InputError as e:
        # only a name collision may fail (slugs of two prompts, or a name and a slug)
        assert "duplicate asset name" in str(e) or "LOD" in str(e)
        return
    assert [s.prompt for s in specs] == [p for _, p, _ in items]
    for s, (name, prompt, seed) in zip(specs, items, strict=True):
        assert s.name == (name.lower() if name else B.slugify(prompt))
        assert B.SAFE_NAME.match(s.name) and s.seed == seed


# --------------------------------------------------------------------------------------------
# Seeds and hashes


def test_seed_follows_the_name_not_the_order():
    a = B.plan_assets(B.parse_prompt_list("chair: a chair\nlamp: a lamp\n"))
    b = B.plan_assets(B.parse_prompt_list("new: a new thing\nlamp: a lamp\nchair: a chair\n"))
    seeds_a = {x.name: x.cfg.seed for x in a}
    seeds_b = {x.name: x.cfg.seed for x in b}
    assert seeds_a["chair"] == seeds_b["chair"] and seeds_a["lamp"] == seeds_b["lamp"]
    assert seeds_a["chair"] != seeds_a["lamp"]
    assert {x.name: x.inputs_sha256 for x in a} == {k: v for k, v in ((x.name, x.inputs_sha256) for x in b) if k in seeds_a}


def test_inputs_hash_covers_prompt_config_model_and_version():
    (a,) = B.plan_assets(B.parse_prompt_list("chair: a chair\n"))
    base = B.inputs_hash(a.prompt, a.cfg, a.model_key)
    assert base == a.inputs_sha256
    from dataclasses import replace

    assert B.inputs_hash("a chair!", a.cfg, a.model_key) != base
    assert B.inputs_hash(a.prompt, replace(a.cfg, seed=a.cfg.seed + 1), a.model_key) != base
    assert B.inputs_hash(a.prompt, a.cfg, {**a.model_key, "revision": "abc"}) != base
    assert B.inputs_hash(a.prompt, a.cfg, a.model_key, version="9.9") != base


def test_a_model_folders_settings_reach_every_asset_and_its_fingerprint(tmp_path):
    """tdgen.toml in the model folder sets the assets' config (under a manifest's own `set`), and
    editing it regenerates the batch (it is one of the folder's files, as the weights are)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "tdgen.toml").write_text("[stage1]\nguidance_scale = 20.0\n")
    f = write(tmp_path / "m.toml", '[[asset]]\nprompt = "a"\n[[asset]]\nprompt = "b"\n'
              'set = { "stage1.guidance_scale" = 30.0 }\n')
    a, b = B.plan_assets(B.load_batch_file(f), sets={"model.id": str(model)})
    assert (a.cfg.stage1.guidance_scale, b.cfg.stage1.guidance_scale) == (20.0, 30.0)
    (model / "tdgen.toml").write_text("[stage1]\nguidance_scale = 25.0\n")
    a2, b2 = B.plan_assets(B.load_batch_file(f), sets={"model.id": str(model)})
    assert (a2.cfg.stage1.guidance_scale, b2.cfg.stage1.guidance_scale) == (25.0, 30.0)
    assert a2.inputs_sha256 != a.inputs_sha256 and b2.inputs_sha256 != b.inputs_sha256


def test_model_key_of_a_local_folder_changes_with_its_files(tmp_path):
    from tdgen.config import ModelConfig

    (tmp_path / "unet").mkdir()
    w = tmp_path / "unet" / "w.safetensors"
    w.write_bytes(b"1234")
    mc = ModelConfig(id=str(tmp_path))
    k1 = B.model_key(mc)
    w.write_bytes(b"123456")
    assert B.model_key(mc) != k1


# --------------------------------------------------------------------------------------------
# Running: outputs, skipping, regeneration


def run(assets, out, **kw):
    results = []
    summary = B.run_batch(
        assets, out, generate_fn=kw.pop("generate_fn", fake_generate),
        load_model_fn=fake_load_model, on_result=results.append, **kw,
    )
    assert [r.name for r in summary.results] == [r.name for r in results]
    return summary, {r.name: r for r in results}


def test_batch_writes_outputs_and_sidecars(tmp_path):
    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    summary, res = run(plan(src), out)
    assert sorted(res) == ["a_glass_potion_bottle", "barrel", "chair"]
    assert {r.status for r in res.values()} == {"done"}
    for name in res:
        assert_valid_glb(out / f"{name}.glb")
        assert (out / f"{name}.preview.png").is_file() and (out / f"{name}.config.toml").is_file()
        side = json.loads((out / f"{name}.tdgen.json").read_text())
        assert side["sha256"] == sha256_file(out / f"{name}.glb")
        assert side["model"] == {"id": side["config"]["model"]["id"], "revision": "fake-commit"}
        assert side["seed"] == side["config"]["seed"] == B.stable_seed(name)
        assert side["tdgen_version"] and side["timings"]["total"] > 0
        assert side["outputs"]["glb"] == f"{name}.glb"
        assert len(side["inputs_sha256"]) == 64
    assert json.loads((out / "chair.tdgen.json").read_text())["prompt"] == "a red wooden chair"
    assert json.loads((out / "barrel.tdgen.json").read_text())["prompt"] == "a medieval barrel"
    assert summary.to_json() == {
        "summary": True, "done": 3, "skipped": 0, "failed": 0, "failed_names": [], "seconds": summary.to_json()["seconds"],
    }
    assert no_temps(out)


def test_rerun_skips_then_regenerates_only_what_changed(tmp_path):
    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    run(plan(src), out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # 1. nothing changed: everything skipped, nothing rewritten
    summary, res = run(plan(src), out)
    assert {r.status for r in res.values()} == {"skipped"}
    assert res["chair"].outputs["glb"] == "chair.glb"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    # 2. one prompt edited: only that one
    write(src, THREE.replace("a red wooden chair", "a blue wooden chair"))
    _, res = run(plan(src), out)
    assert {n: r.status for n, r in res.items()} == {"chair": "done", "barrel": "skipped", "a_glass_potion_bottle": "skipped"}
    assert json.loads((out / "chair.tdgen.json").read_text())["prompt"] == "a blue wooden chair"

    # 3. a .glb deleted, another corrupted, a preview truncated: exactly those regenerate
    (out / "barrel.glb").unlink()
    (out / "chair.glb").write_bytes(b"glTF garbage")
    _, res = run(plan(src), out)
    assert {n: r.status for n, r in res.items()} == {"chair": "done", "barrel": "done", "a_glass_potion_bottle": "skipped"}
    assert_valid_glb(out / "barrel.glb")
    assert_valid_glb(out / "chair.glb")
    (out / "barrel.preview.png").write_bytes(b"")
    _, res = run(plan(src), out)
    assert [n for n, r in res.items() if r.status == "done"] == ["barrel"]

    # 4. a changed setting changes the hash; --force regenerates everything
    _, res = run(plan(src, sets={"export.height": 2.0}), out)
    assert {r.status for r in res.values()} == {"done"}
    _, res = run(plan(src, sets={"export.height": 2.0}), out, force=True)
    assert {r.status for r in res.values()} == {"done"}


def test_only_restricts_and_unknown_names_list_valid_ones(tmp_path):
    src = write(tmp_path / "p.txt", THREE)
    assets = plan(src)
    picked = B.select_assets(assets, ["Barrel,chair"])
    assert [a.name for a in picked] == ["chair", "barrel"]
    _, res = run(picked, tmp_path / "out")
    assert sorted(res) == ["barrel", "chair"]
    assert not (tmp_path / "out" / "a_glass_potion_bottle.glb").exists()
    with pytest.raises(InputError, match=r"unknown asset name\(s\) lamp; valid names: chair, barrel, a_glass_potion_bottle"):
        B.select_assets(assets, ["chair", "lamp"])


def test_failures_are_isolated(tmp_path, caplog):
    src = write(tmp_path / "p.txt", THREE.replace("a medieval barrel", "a FAIL barrel"))
    out = tmp_path / "out"
    summary, res = run(plan(src), out)
    assert {n: r.status for n, r in res.items()} == {"chair": "done", "barrel": "failed", "a_glass_potion_bottle": "done"}
    assert res["barrel"].reason == "RuntimeError: stand-in failure"
    assert not (out / "barrel.tdgen.json").exists() and not (out / "barrel.glb").exists()
    assert "Traceback" in caplog.text  # a non-tdgen error is a bug: its traceback is logged
    with pytest.raises(BatchError) as ei:
        summary.raise_for_failures()
    assert ei.value.exit_code == 5 and "barrel" in str(ei.value)


def test_oom_frees_the_accelerator_and_continues(tmp_path, monkeypatch):
    freed = []
    monkeypatch.setattr(R, "_free_accelerator", lambda: freed.append(1))
    src = write(tmp_path / "p.txt", "a: an OOM thing\nb: a fine thing\n")
    _, res = run(plan(src), tmp_path / "out")
    assert res["a"].status == "failed" and "out of memory" in res["a"].reason
    assert res["b"].status == "done" and freed == [1]


def test_model_is_loaded_once_and_load_failure_is_per_asset(tmp_path):
    src = write(tmp_path / "p.txt", THREE)
    loads = []

    def counting_load(mc, device):
        loads.append(mc.id)
        return fake_load_model(mc, device)

    B.run_batch(plan(src), tmp_path / "out", generate_fn=fake_generate, load_model_fn=counting_load)
    assert len(loads) == 1

    def missing(mc, device):
        loads.append("missing")
        from tdgen.errors import ModelNotFoundError

        raise ModelNotFoundError("model x is not cached; run hf download x")

    loads.clear()
    s = B.run_batch(plan(src), tmp_path / "out2", generate_fn=fake_generate, load_model_fn=missing)
    assert [r.status for r in s.results] == ["failed"] * 3
    assert s.results[0].reason == "model x is not cached; run hf download x"
    assert loads == ["missing"]  # not retried per asset


def test_stale_temps_removed_and_interrupt_cleans_up(tmp_path, monkeypatch):
    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    out.mkdir()
    # a leftover whose writer cannot be told (old naming), hours old: stale
    old = out / f"{TEMP_PREFIX}abc.glb"
    old.write_bytes(b"half")
    os.utime(old, (time.time() - 3 * 3600,) * 2)
    monkeypatch.setenv("TDGEN_TEST_INTERRUPT", "barrel")
    with pytest.raises(KeyboardInterrupt):
        run(plan(src), out)
    assert no_temps(out)
    assert_valid_glb(out / "chair.glb") and (out / "chair.tdgen.json").is_file()
    assert not (out / "barrel.glb").exists()
    monkeypatch.delenv("TDGEN_TEST_INTERRUPT")
    _, res = run(plan(src), out)
    assert {n: r.status for n, r in res.items()} == {"chair": "skipped", "barrel": "done", "a_glass_potion_bottle": "done"}


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_batch as T
from tdgen import batch as B
from tdgen.batch import runners as R
from tdgen.batch import specs as S
assets = B.plan_assets(B.load_batch_file({src!r}), sets=T.FAST)
B.run_batch(assets, {out!r}, generate_fn=T.fake_generate, load_model_fn=T.fake_load_model)
"""


def test_kill_9_mid_asset_then_rerun_leaves_nothing_partial(tmp_path):
    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    # a previous complete run, so a kill also lands on top of old outputs and an old sidecar
    run(plan(src), out)
    write(src, THREE.replace("a medieval barrel", "a medieval oak barrel"))
    env = {**os.environ, "TDGEN_TEST_HANG": "barrel", "TDGEN_TEST_HANG_READY": str(ready), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(tests=str(TESTS_DIR), src=str(src), out=str(out))],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "stand-in never reached its write"
            time.sleep(0.05)
        assert not no_temps(out)  # the half-written temp is really there
        # mid-write, the previous barrel is whole: its files and the sidecar vouching for them
        old_side = json.loads((out / "barrel.tdgen.json").read_text())
        assert old_side["prompt"] == "a medieval barrel"
        assert all(sha256_file(out / rel) == h for rel, h in old_side["files"].items())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, res = run(plan(src), out)
    assert res["barrel"].status == "done"
    assert res["chair"].status == res["a_glass_potion_bottle"].status == "skipped"
    assert no_temps(out)
    for name in res:
        assert_valid_glb(out / f"{name}.glb")
        side = json.loads((out / f"{name}.tdgen.json").read_text())
        assert side["sha256"] == sha256_file(out / f"{name}.glb")
    assert json.loads((out / "barrel.tdgen.json").read_text())["prompt"] == "a medieval oak barrel"


# --------------------------------------------------------------------------------------------
# The CLI


def cli(args):
    from typer.testing import CliRunner

    from tdgen.cli import app

    return CliRunner().invoke(app, ["batch", *args])


def test_cli_json_lines_and_exit_code_5(tmp_path, fakes):
    src = write(tmp_path / "p.txt", THREE.replace("a medieval barrel", "a FAIL barrel"))
    out = tmp_path / "out"
    r = cli([str(src), "-o", str(out), "--json", "--set", "stage1.steps=2"])
    assert r.exit_code == 5, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    by_name = {x["name"]: x for x in lines if "name" in x}
    assert by_name["chair"]["status"] == "done" and by_name["chair"]["outputs"]["glb"] == "chair.glb"
    assert by_name["barrel"]["status"] == "failed" and by_name["barrel"]["reason"]
    assert lines[-1]["summary"] is True and (lines[-1]["done"], lines[-1]["failed"]) == (2, 1)
    # rerun with the prompt fixed: the two finished ones are skipped, exit 0
    write(src, THREE)
    r = cli([str(src), "-o", str(out), "--json", "--set", "stage1.steps=2"])
    assert r.exit_code == 0, r.output
    statuses = {x["name"]: x["status"] for x in map(json.loads, r.stdout.splitlines()) if "name" in x}
    assert statuses == {"chair": "skipped", "barrel": "done", "a_glass_potion_bottle": "skipped"}
    assert fakes.count("chair") == 1 and fakes.count("barrel") == 2


def test_cli_rejects_bad_input_before_any_work(tmp_path, fakes):
    src = write(tmp_path / "p.txt", "chair: a chair\nlamp:\n")
    r = cli([str(src), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "p.txt:2" in r.output
    m = write(tmp_path / "m.toml", '[[asset]]\nprompt = "a"\n\n[[asset]]\nprompt = "b"\nset = { "mesh.grid" = 2 }\n')
    r = cli([str(m), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "m.toml:4" in r.output and "mesh.grid" in r.output
    good = write(tmp_path / "q.txt", THREE)
    r = cli([str(good), "-o", str(tmp_path / "out"), "--only", "lamp"])
    assert r.exit_code == 2 and "valid names: chair, barrel" in r.output
    r = cli([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = cli([str(good), "-o", str(tmp_path / "out"), "--workers", "2"])
    assert r.exit_code == 2 and "--backend ray" in r.output
    r = cli([str(good), "-o", str(tmp_path / "out"), "--gpus", "0,x"])
    assert r.exit_code == 2 and "GPU indices" in r.output
    assert fakes == [] and not (tmp_path / "out").exists()


def test_cli_ctrl_c_exits_130_without_temp_files(tmp_path, fakes, monkeypatch):
    src = write(tmp_path / "p.txt", THREE)
    monkeypatch.setenv("TDGEN_TEST_INTERRUPT", "barrel")
    r = cli([str(src), "-o", str(tmp_path / "out")])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert fakes == ["chair", "barrel"] and no_temps(tmp_path / "out")


def test_cli_only_and_force(tmp_path, fakes):
    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    assert cli([str(src), "-o", str(out), "--only", "chair", "--only", "barrel"]).exit_code == 0
    assert sorted(fakes) == ["barrel", "chair"]
    fakes.clear()
    r = cli([str(src), "-o", str(out), "--force", "--only", "chair", "--json"])
    assert r.exit_code == 0 and fakes == ["chair"]


# --------------------------------------------------------------------------------------------
# Workers


def test_worker_processes_on_cpu(tmp_path, monkeypatch):
    """The --gpus plumbing (spawned workers, shared queue, per-worker CUDA_VISIBLE_DEVICES) on CPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "parent")
    src = write(tmp_path / "p.txt", THREE + "lamp: a lamp\nbroken: a FAIL thing\n")
    out = tmp_path / "out"
    progress = []
    summary = B.run_batch(
        plan(src), out, gpus=[0, 1], device="cpu", generate_fn=fake_generate, load_model_fn=fake_load_model,
        on_progress=lambda n, p: progress.append((n, p.stage)),
    )
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "parent"
    assert sorted(summary.names("done")) == ["a_glass_potion_bottle", "barrel", "chair", "lamp"]
    assert summary.names("failed") == ["broken"]  # isolated inside its worker too
    sides = [json.loads((out / f"{n}.tdgen.json").read_text()) for n in summary.names("done")]
    assert {s["counts"]["cvd"] for s in sides} <= {0, 1}
    assert all(s["counts"]["pid"] != os.getpid() for s in sides)
    assert all(s["counts"]["loads"] == 1 for s in sides)  # one model load per worker process
    assert ("lamp", "stage1") in progress and ("lamp", "export") in progress
    # same inputs hashes as an in-process plan: a rerun in-process skips everything
    _, res = run(plan(src), out)
    assert {n: r.status for n, r in res.items() if r.status != "skipped"} == {"broken": "failed"}


@pytest.mark.slow
def test_ray_backend_matches_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    src = write(tmp_path / "p.txt", THREE.replace("a medieval barrel", "a FAIL barrel"))
    local, res_local = run(plan(src), tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{ROOT}"}})
    try:
        remote, res_ray = run(plan(src), tmp_path / "ray", backend="ray", workers=2)
    finally:
        ray.shutdown()
    assert {n: r.status for n, r in res_ray.items()} == {n: r.status for n, r in res_local.items()}
    assert res_ray["barrel"].reason == res_local["barrel"].reason
    for name in local.names("done"):
        a = json.loads((tmp_path / "local" / f"{name}.tdgen.json").read_text())
        b = json.loads((tmp_path / "ray" / f"{name}.tdgen.json").read_text())
        assert a["inputs_sha256"] == b["inputs_sha256"] and a["sha256"] == b["sha256"]
        assert b["counts"]["pid"] != os.getpid()


def test_ray_missing_gives_install_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    src = write(tmp_path / "p.txt", THREE)
    with pytest.raises(InputError, match=r'pip install "tdgen\[ray\]"'):
        run(plan(src), tmp_path / "out", backend="ray")


@pytest.mark.gpu
def test_gpu_workers_each_see_one_gpu(tmp_path):
    import torch

    n = min(2, torch.cuda.device_count())
    src = write(tmp_path / "p.txt", THREE)
    s = B.run_batch(plan(src), tmp_path / "out", gpus=list(range(n)), generate_fn=fake_generate,
                    load_model_fn=fake_load_model)
    assert len(s.names("done")) == 3
    sides = [json.loads((tmp_path / "out" / f"{x}.tdgen.json").read_text()) for x in s.names("done")]
    assert {x["counts"]["cvd"] for x in sides} <= set(range(n))


# --------------------------------------------------------------------------------------------
# End to end with the tiny model


def _pipeline_ready() -> bool:
    import importlib.util

    # find_spec, not import: this runs at collection, and in every worker process that imports
    # this module for the stand-ins, which must not pay for importing torch.
    mods = ("guidance", "optimize", "mesh", "unwrap", "texture", "refine", "preview", "export")
    return all(importlib.util.find_spec(f"tdgen.{m}") is not None for m in mods)


@pytest.mark.slow
@pytest.mark.skipif(not _pipeline_ready(), reason="the pipeline's stage modules have not all landed yet")
def test_end_to_end_three_assets_with_the_tiny_model(tmp_path, tiny_model_dir):
    # tiny_config's model, cut further (3 assets on a 2-core CPU): a 2-step splat, a coarse grid,
    # a bake from 4 views and no refinement. A 128² atlas because xatlas cannot pack into 64².
    sets = {
        "model.id": str(tiny_model_dir), "stage1.steps": 2, "stage1.resolution": 64,
        "stage1.encode_resolution": 64, "stage1.num_points": 400, "stage1.max_points": 2000,
        "mesh.grid": 32, "mesh.triangles": 400, "texture.size": 128, "texture.bake_views": 4,
        "texture.bake_resolution": 32, "texture.refine_steps": 0, "export.splat": False,
    }
    src = write(tmp_path / "p.txt", "cube: a red cube\nball: a blue ball\ncone: a green cone\n")
    assets = B.plan_assets(B.load_batch_file(src), preset="draft", sets=sets)
    out = tmp_path / "out"
    s = B.run_batch(assets, out, device="cpu")
    assert s.names("done") == ["cube", "ball", "cone"], [r.reason for r in s.results]
    for name in s.names("done"):
        assert_valid_glb(out / f"{name}.glb")
        side = json.loads((out / f"{name}.tdgen.json").read_text())
        assert side["sha256"] == sha256_file(out / f"{name}.glb")
        assert side["model"]["files"]  # a local folder: guidance's per-file sha256
        assert (out / f"{name}.preview.png").read_bytes()[:4] == b"\x89PNG"
    again = B.run_batch(B.plan_assets(B.load_batch_file(src), preset="draft", sets=sets), out, device="cpu")
    assert again.names("skipped") == ["cube", "ball", "cone"]
    assert no_temps(out)


@pytest.mark.slow
def test_two_concurrent_batches_into_one_folder(tmp_path, tiny_model_dir):
    """Each batch cleans up temp files at its start and end; neither may touch the other's files
    in flight (B starts while A holds staged outputs)."""
    out = tmp_path / "out"
    lists = {}
    for tag in ("a", "b"):
        lists[tag] = write(tmp_path / f"{tag}.txt", "".join(f"{tag}{i}: a {tag} thing number {i}\n" for i in range(4)))
    args = ["-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--preset", "smoke",
            "--set", "stage1.steps=2", "--set", "texture.refine_steps=0", "--set", "export.preview=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(tag):
        return subprocess.Popen([sys.executable, "-m", "tdgen.cli", "batch", str(lists[tag]), *args],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    a = start("a")
    deadline = time.time() + 120
    while no_temps(out) if out.exists() else True:
        assert a.poll() is None, a.stderr.read().decode()
        assert time.time() < deadline, "batch A never wrote a temp file"
        time.sleep(0.02)
    b = start("b")
    errs = {tag: p.communicate(timeout=300)[1].decode() for tag, p in (("a", a), ("b", b))}
    assert (a.returncode, b.returncode) == (0, 0), errs
    for name in [f"{t}{i}" for t in "ab" for i in range(4)]:
        assert_valid_glb(out / f"{name}.glb")
        side = json.loads((out / f"{name}.tdgen.json").read_text())
        assert all(sha256_file(out / rel) == h for rel, h in side["files"].items())
    assert no_temps(out)


# --------------------------------------------------------------------------------------------
# The review report


def _report_rows(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "report_assets" / "rows.json").read_text())}


def test_report_cards_say_new_changed_skipped_failed(tmp_path, fakes):
    src = write(tmp_path / "p.txt", THREE.replace("a medieval barrel", "a FAIL barrel"))
    out = tmp_path / "out"
    r = cli([str(src), "-o", str(out), "--report"])
    assert r.exit_code == 5 and "report.html" in r.output  # written even when an asset failed
    rows = _report_rows(out)
    assert {n: x["status"] for n, x in rows.items()} == {
        "chair": "new", "barrel": "failed", "a_glass_potion_bottle": "new"}
    assert "stand-in failure" in rows["barrel"]["reason"] and rows["barrel"]["glb"] == ""
    page = (out / "report.html").read_text()
    assert page.count('<div class="card"') == 3 and page.count("<model-viewer ") == 2
    assert 'src="chair.glb"' in page and 'poster="chair.preview.png"' in page
    assert "a red wooden chair" in page and "seed " in page and "standard" in page
    assert (out / "report_assets" / "model-viewer-umd.min.js").stat().st_size > 500_000
    md = (out / "report.md").read_text()
    assert "| barrel | failed | a FAIL barrel |" in md and "3 assets: 2 new, 0 changed, 0 skipped, 1 failed" in md

    # Second run: the chair's prompt changed, the barrel fixed (never made: new), the potion as it was.
    write(src, THREE.replace("a red wooden chair", "a blue wooden chair"))
    assert cli([str(src), "-o", str(out), "--report"]).exit_code == 0
    rows = _report_rows(out)
    assert {n: x["status"] for n, x in rows.items()} == {
        "chair": "changed", "barrel": "new", "a_glass_potion_bottle": "skipped"}
    assert "| a_glass_potion_bottle | skipped |" in (out / "report.md").read_text()
    assert no_temps(out)


def test_report_page_loads_its_models_in_chromium(tmp_path, fakes):
    """Served over HTTP, headless Chromium loads the page, model-viewer draws every model (the
    page title counts the load events), and the cards are on screen."""
    from tdgen.testing import threejs_render

    if threejs_render.chromium() is None:
        if os.environ.get("CI") and not os.environ.get("TDGEN_CI_NO_CHROMIUM"):
            pytest.fail("chromium is missing in CI; .ci/run installs Debian's chromium")
        pytest.skip("needs chromium (apt-get install chromium)")
    import numpy as np
    from PIL import Image

    src = write(tmp_path / "p.txt", THREE)
    out = tmp_path / "out"
    assert cli([str(src), "-o", str(out), "--report"]).exit_code == 0
    shot = tmp_path / "report.png"
    with threejs_render.serve(out) as url:
        dom = threejs_render.capture(f"{url}/report.html", shot, 900, 700,
                                     done="document.title.includes('models loaded')")
    assert "3/3 models loaded" in dom, dom[:500]
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[:2] == (700, 900) and img.std() > 10  # cards and models, not a blank page
