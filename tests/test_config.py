import tomllib
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdgen import config as C
from tdgen.errors import ConfigError


def test_standard_preset_is_the_code_defaults():
    assert C.resolve_config("standard") == C.Config()
    s1 = C.Config().stage1
    # DreamGaussian's text-to-3D settings, as the issue asks
    assert (s1.steps, s1.guidance_scale, s1.num_points, s1.resolution) == (500, 100.0, 5000, 512)
    assert (s1.camera_radius, s1.fovy, s1.elevation_min, s1.elevation_max) == (2.5, 49.1, -30.0, 30.0)
    # t_max: DreamGaussian's 0.98 fogged the toy prior's mug (stage1.t_max's docstring)
    assert (s1.t_max, s1.t_min) == (0.8, 0.02)


@pytest.mark.parametrize("name", ["draft", "standard", "quality", "smoke"])
def test_presets_load_and_only_list_known_keys(name):
    changes = C.load_preset(name)
    cfg = C.resolve_config(name)
    for key, value in changes.items():
        section, k = key.split(".")
        assert getattr(getattr(cfg, section), k) == value
        # a preset lists only what differs from the defaults
        assert getattr(getattr(C.Config(), section), k) != value


def test_draft_is_lighter_than_quality():
    d, q = C.resolve_config("draft"), C.resolve_config("quality")
    assert d.stage1.steps < C.Config().stage1.steps < q.stage1.steps
    assert d.mesh.triangles == 5000 and C.Config().mesh.triangles == 20000 and q.mesh.triangles == 50000


def test_every_field_has_a_docstring():
    for cls in C.SECTIONS.values():
        docs = C.field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert C.field_docs(C.Config)["seed"]


def test_set_overrides_are_typed():
    cfg = C.resolve_config(
        "standard",
        C.parse_set_args(["stage1.steps=300", "stage1.guidance_scale=7.5", "export.shading=lit",
                          "stage1.view_prompts=false", "seed=42", "model.id=/tmp/m"]),
    )
    assert cfg.stage1.steps == 300 and isinstance(cfg.stage1.steps, int)
    assert cfg.stage1.guidance_scale == 7.5
    assert cfg.export.shading == "lit"
    assert cfg.stage1.view_prompts is False
    assert cfg.seed == 42 and cfg.model.id == "/tmp/m"


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("nosection.steps=1", "valid sections: model, stage1, mesh, texture, export"),
        ("stage1.nokey=1", "valid keys of [stage1]: steps"),
        ("stage1.steps=abc", "expected an integer"),
        ("stage1.steps=1.5", "expected an integer"),
        ("stage1.guidance_scale=nan", "finite number"),
        ("export.shading=pbr", "use one of unlit, lit"),
        ("export.lod_layout=unity", "use one of files, nodes, msft_lod"),
        ("stage1.sds_space=pixel", "use one of latent, image"),
        ("stage1.sds_image_start=1.5", "use a value from 0 to 1 (a fraction of the steps)"),
        ("stage1.sds_image_guidance=-1", "use a value from 0 to 1000"),
        ("stage1.view_prompts=maybe", "true or false"),
        ("texture.size=1000", "power of two"),
        ("stage1.steps=0", "use a value from 1 to 100000"),
        ("mesh.grid=100000", "use a value from 16 to 512 (memory grows with its cube)"),
        ("stage1.guidance_scale=inf", "finite number"),
        ("export.height=-1", "use a value from 0.001 to 1000 (metres)"),
        ("stage1.max_points=10", "must be at least stage1.num_points"),
        ("model.id=", "must not be empty"),
        ("stage1.negative_prompt=bad \udcff byte", "not valid UTF-8 (at character 5)"),
        ("bogus=1", "unknown setting"),
        ("stage1.steps", "expected section.key=value"),
    ],
)
def test_bad_settings_are_one_line_errors_with_the_choices(item, fragment):
    with pytest.raises(ConfigError) as e:
        C.resolve_config("standard", C.parse_set_args([item]))
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg
    assert e.value.exit_code == 2


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: draft, quality, smoke, standard"):
        C.resolve_config("ultra")


def test_dump_toml_round_trips(tmp_path):
    cfg = C.resolve_config("quality", {"stage1.negative_prompt": 'blurry, "low" quality', "seed": 7})
    path = tmp_path / "c.toml"
    path.write_text(C.dump_toml(cfg))
    tomllib.loads(path.read_text())  # valid TOML
    again = C.apply_overrides(C.Config(), C.load_toml_file(path))
    assert again == cfg


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_toml_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[stage1\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.load_toml_file(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[render]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        C.load_toml_file(unknown)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        C.load_toml_file(binary)
    with pytest.raises(ConfigError, match="is a folder"):
        C.load_toml_file(tmp_path)


def test_shortcut_layers():
    cfg = C.resolve_config(None, layers=C.shortcut_layers(seed=3, model="m", negative="ugly", lods=2))
    assert (cfg.seed, cfg.model.id, cfg.stage1.negative_prompt, cfg.export.lods) == (3, "m", "ugly", 2)
    with pytest.raises(ConfigError):
        C.resolve_config(None, layers=C.shortcut_layers(lods=-1))



def test_model_folder_settings_sit_under_everything_the_user_gives(tmp_path):
    (tmp_path / C.MODEL_SETTINGS_FILE).write_text("[stage1]\nguidance_scale = 20.0\nt_max = 0.7\n")
    model = {"model.id": str(tmp_path)}
    cfg = C.resolve_config("draft", model)
    assert (cfg.stage1.guidance_scale, cfg.stage1.t_max, cfg.stage1.steps) == (20.0, 0.7, 250)
    # --set wins over the folder's file, and so do the --model shortcut's and --config's layers.
    cfg = C.resolve_config("standard", model | {"stage1.guidance_scale": "50"})
    assert (cfg.stage1.guidance_scale, cfg.stage1.t_max) == (50.0, 0.7)
    cfg = C.resolve_config("standard", {}, layers=[({"stage1.t_max": 0.9}, "cfg.toml")]
                           + C.shortcut_layers(model=str(tmp_path), seed=4))
    assert (cfg.stage1.guidance_scale, cfg.stage1.t_max, cfg.seed) == (20.0, 0.9, 4)
    # Without the folder (a hub id, the default) nothing changes.
    assert C.resolve_config("standard", {"model.id": str(tmp_path / "other")}).stage1.guidance_scale == 100.0
    assert C.resolve_config("standard") == C.Config()


def test_model_folder_settings_may_not_change_what_is_made(tmp_path):
    (tmp_path / C.MODEL_SETTINGS_FILE).write_text("[export]\nheight = 2.0\n")
    with pytest.raises(ConfigError, match=r"'export.height' is not a model setting.*--set"):
        C.resolve_config("standard", {"model.id": str(tmp_path)})
    (tmp_path / C.MODEL_SETTINGS_FILE).write_text("[stage1]\nguidance_scale = -3.0\n")
    with pytest.raises(ConfigError, match="guidance_scale"):
        C.resolve_config("standard", {"model.id": str(tmp_path)})

@given(st.integers(min_value=1, max_value=100_000))
def test_int_values_parse(n):
    assert C.resolve_config(None, {"stage1.steps": str(n)}).stage1.steps == n


@given(st.floats(min_value=0, max_value=1000, allow_nan=False))
def test_float_values_parse(x):
    assert C.resolve_config(None, {"stage1.guidance_scale": repr(x)}).stage1.guidance_scale == x


@given(st.one_of(st.floats(allow_nan=True), st.integers()), st.sampled_from(sorted(C.LIMITS)))
def test_every_bound_holds_whatever_the_value(x, key):
    """Any number from any source either lands inside LIMITS or is a one-line ConfigError."""
    try:
        cfg = C.resolve_config(None, {key: x})
    except ConfigError as e:
        assert "\n" not in str(e) and key in str(e)
        return
    value = cfg.seed if key == "seed" else getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
    lo, hi, _ = C.LIMITS[key]
    assert lo <= value <= hi


@pytest.mark.parametrize("source", ["set", "config", "preset"])
def test_same_error_text_from_every_source(tmp_path, monkeypatch, source):
    """nan from --set, from a --config file and from a preset: one message, exit 2."""
    want = "stage1.guidance_scale: expected a finite number, got nan"
    path = tmp_path / "c.toml"
    path.write_text("[stage1]\nguidance_scale = nan\n")
    with pytest.raises(ConfigError) as e:
        if source == "set":
            C.apply_overrides(C.Config(), C.parse_set_args(["stage1.guidance_scale=nan"]))
        elif source == "config":
            C.apply_overrides(C.Config(), C.load_toml_file(path), source=str(path))
        else:
            monkeypatch.setattr(C, "_presets_dir", lambda: tmp_path)
            C.resolve_config("c")
    assert str(e.value).endswith(want) and e.value.exit_code == 2


def test_config_in_code_is_validated_too():
    from dataclasses import replace

    bad = replace(C.Config(), export=replace(C.Config().export, height=float("inf")))
    with pytest.raises(ConfigError, match="export.height: expected a finite number"):
        C.validate(bad)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_string_values_survive_toml(text):
    cfg = C.resolve_config(None, {"stage1.negative_prompt": text})
    again = C.apply_overrides(C.Config(), {"stage1.negative_prompt": tomllib.loads(C.dump_toml(cfg))["stage1"]["negative_prompt"]})
    assert again.stage1.negative_prompt == text


def test_every_number_has_bounds():
    """A new int/float setting must get a LIMITS entry, or a typo in it could ask for any memory."""
    missing = [key for key, value in C._flat_items(C.Config())
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in C.LIMITS]
    assert not missing, f"add these to tdgen.config.LIMITS: {missing}"
    assert set(C.LIMITS) <= {key for key, _ in C._flat_items(C.Config())}  # no stale entries
    for key, value in C._flat_items(C.resolve_config("quality")):
        C.check_range(key, value)  # every shipped preset is inside them
