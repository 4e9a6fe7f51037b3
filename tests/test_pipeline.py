"""End to end on the CPU: the tiny random model through `tdgen make`, and `tdgen mesh` on a splat."""

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from typer.testing import CliRunner

from tdgen.cli import app
from tdgen.config import load_toml_file
from tdgen.gaussians import Gaussians, save_ply
from tdgen.testing.gltf_validator import validate_glb

runner = CliRunner()
C0 = 0.28209479177387814


def _tiny_args(tiny_config):
    """The tiny_config fixture as --set arguments (the CLI path the user takes)."""
    from tdgen.config import Config, dump_toml

    import tomllib

    flat = []
    data = tomllib.loads(dump_toml(tiny_config))
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if getattr(getattr(Config(), section), k) != v:
                flat += ["--set", f"{section}.{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return flat


def _assert_valid_glb(path):
    report = validate_glb(path)
    assert report["numErrors"] == 0 and report["numWarnings"] == 0, report
    scene = trimesh.load(path)
    geom = next(iter(scene.geometry.values()))
    assert geom.visual.uv is not None and len(geom.visual.uv) == len(geom.vertices)
    assert geom.visual.material.baseColorTexture is not None
    return scene


def test_make_with_tiny_model_writes_glb_preview_config(tmp_path, tiny_config):
    out = tmp_path / "chair.glb"
    r = runner.invoke(app, ["make", "a red chair", "-o", str(out), "--preset", "draft", "--device", "cpu", "--json", *_tiny_args(tiny_config)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(info["outputs"]) >= {"glb", "preview", "config", "splat"}
    assert info["counts"]["triangles"] > 0 and info["timings"]["stage1"] > 0
    scene = _assert_valid_glb(out)
    lo, hi = scene.bounds
    assert math.isclose(hi[1] - lo[1], 1.0, rel_tol=1e-3) and abs(lo[1]) < 1e-4  # 1 m tall, pivot at the bottom
    assert (tmp_path / "chair.preview.png").stat().st_size > 0
    cfg = load_toml_file(tmp_path / "chair.config.toml")
    assert cfg["stage1.steps"] == tiny_config.stage1.steps
    assert not list(tmp_path.glob(".tdgen-tmp-*"))


def test_make_ply_only_stops_after_stage1(tmp_path, tiny_config):
    from tdgen.gaussians import load_ply

    out = tmp_path / "s.ply"
    r = runner.invoke(app, ["make", "a cup", "-o", str(out), "--device", "cpu", *_tiny_args(tiny_config)])
    assert r.exit_code == 0, r.output
    assert load_ply(out).num > 0
    assert not list(tmp_path.glob("*.glb"))


def _two_colour_sphere(n=6000, radius=0.5, seed=0):
    """Gaussians on a sphere: red where x > 0, blue where x < 0."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    rgb = torch.where(d[:, :1] > 0, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]))
    return Gaussians(
        means=d * radius,
        scales=torch.full((n, 3), math.log(0.03)),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        opacities=torch.full((n,), 3.0),
        sh0=(rgb - 0.5) / C0,
        shN=torch.zeros(n, 0, 3),
    )


def test_mesh_command_half_red_half_blue(tmp_path):
    from tdgen.meshdata import Mesh
    from tdgen.raster import render_mesh
    from tdgen.render import orbit_cameras

    ply = tmp_path / "ball.ply"
    save_ply(_two_colour_sphere(), ply)
    out = tmp_path / "ball.glb"
    r = runner.invoke(app, ["mesh", str(ply), "-o", str(out), "--preset", "draft", "--device", "cpu",
                            "--set", "mesh.grid=64", "--set", "texture.size=128", "--set", "texture.bake_resolution=96",
                            "--set", "texture.bake_views=10", "--set", "mesh.triangles=2000", "--set", "export.preview=false",
                            "--set", "export.turntable=true", "--set", "export.collision=hull"])
    assert r.exit_code == 0, r.output
    import pygltflib

    nodes = [n.name for n in pygltflib.GLTF2().load(str(out)).nodes]
    assert nodes == ["ball", "ball_col00-convcolonly"]  # the render mesh, then its collider
    # the turntable is a setting of its own: written beside the .glb even with the preview off
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball.config.toml", "ball.glb", "ball.ply",
                                                          "ball.turntable.webp"]
    scene = _assert_valid_glb(out)
    geom = next(iter(scene.geometry.values()))
    tex = torch.from_numpy(np.asarray(geom.visual.material.baseColorTexture.convert("RGB"), dtype=np.float32) / 255.0)
    centre = (geom.bounds[0] + geom.bounds[1]) / 2
    mesh = Mesh(
        vertices=(geom.vertices - centre).astype(np.float32),
        faces=np.asarray(geom.faces, dtype=np.int64),
        normals=np.asarray(geom.vertex_normals, dtype=np.float32),
        uvs=np.asarray(geom.visual.uv, dtype=np.float32),
    )
    # trimesh flips v on load (its UV origin is bottom-left); undo it to get back glTF's convention
    mesh.uvs[:, 1] = 1.0 - mesh.uvs[:, 1]
    cams = orbit_cameras(torch.tensor([0.0, 0.0]), torch.tensor([90.0, -90.0]), 3.0, 40.0, 64, 64)
    rgb, alpha = render_mesh(mesh, tex, cams, torch.ones(2, 3))
    for view, (want, other) in enumerate(((0, 2), (2, 0))):
        covered = alpha[view, ..., 0] > 0.5
        assert covered.sum() > 100
        mean = rgb[view][covered].mean(0)
        assert mean[want] > 0.6 and mean[other] < 0.3, (view, mean)


@pytest.mark.gpu
def test_generate_on_cuda_with_tiny_model(tmp_path, tiny_config):
    """The whole pipeline on the GPU path (gsplat, CUDA graphs, GPU grid/raster) with the tiny model."""
    from tdgen.pipeline import generate
    from tdgen.testing.gltf_validator import validator_available

    out = tmp_path / "cuda.glb"
    result = generate("a red chair", tiny_config, out, device="cuda")
    assert result.counts["triangles"] > 0 and out.stat().st_size > 0
    if validator_available():
        _assert_valid_glb(out)
    else:
        scene = trimesh.load(out)
        assert next(iter(scene.geometry.values())).visual.uv is not None


def test_lods_halve_every_level_and_stay_closed():
    """Each LOD is decimated from the closed surface and unwrapped anew, so its triangle count
    halves at every level (keeping the full asset's UVs, it stalled at ~1/4: the seams)."""
    from dataclasses import replace as dc_replace

    import trimesh

    from tdgen.config import Config
    from tdgen.errors import GenerationError
    from tdgen.meshdata import Mesh
    from tdgen.pipeline import LOD_MIN_TEXTURE, _build_lods
    from tdgen.texture import _texel_geometry
    from tdgen.unwrap import unwrap_mesh

    def closed(subdivisions):
        ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
        return Mesh(vertices=ico.vertices.astype(np.float32), faces=ico.faces.astype(np.int64),
                    normals=ico.vertex_normals.astype(np.float32))

    base = Config()
    cfg = dc_replace(base, export=dc_replace(base.export, lods=3), texture=dc_replace(base.texture, size=512))
    surface = closed(4)  # 5120 triangles
    textured = unwrap_mesh(surface, cfg.texture)
    texture = torch.full((512, 512, 3), 0.25)
    lods = _build_lods(surface, textured, texture, cfg, torch.device("cpu"))
    counts = [m.num_faces for m, _, _ in lods]
    assert all(0.9 * (5120 >> k) <= c <= (5120 >> k) for k, c in enumerate(counts, start=1)), counts
    assert [t.shape[0] for _, t, _ in lods] == [256, max(LOD_MIN_TEXTURE, 128), max(LOD_MIN_TEXTURE, 64)]
    assert all(n is None for _, _, n in lods)  # no high-poly given: no normal maps
    for m, t, _ in lods:
        tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
        tm.merge_vertices(merge_tex=True, merge_norm=True)
        assert tm.is_watertight and tm.volume > 0
        idx, _, _ = _texel_geometry(m, t.shape[0], None)
        assert torch.allclose(t.view(-1, 3)[idx], torch.tensor(0.25), atol=1e-3)

    small = closed(2)  # 320 triangles: level 5 would have 10
    cfg5 = dc_replace(cfg, export=dc_replace(cfg.export, lods=5))
    with pytest.raises(GenerationError, match="export.lods=5.*lower export.lods or raise mesh.triangles"):
        _build_lods(small, unwrap_mesh(small, cfg.texture), texture, cfg5, torch.device("cpu"))


@pytest.mark.parametrize("layout, kept", [("files", ["rock_lod1.glb"]), ("nodes", []), ("msft_lod", [])])
def test_lod_files_of_an_earlier_run_go_unless_this_layout_writes_them(tmp_path, layout, kept):
    """An earlier `files` run left rock_lod1.glb and rock_lod2.glb; a run with one LOD keeps
    rock_lod1.glb only when it writes LOD files itself, never when its LODs live in rock.glb."""
    from dataclasses import replace as dc_replace

    from tdgen.config import Config
    from tdgen.pipeline import _lod_files, _stale_lods

    for n in ("rock.glb", "rock_lod1.glb", "rock_lod2.glb", "rock_lodx.glb"):
        (tmp_path / n).write_bytes(b"old")
    base = Config()
    cfg = dc_replace(base, export=dc_replace(base.export, lods=1, lod_layout=layout))
    stale = _stale_lods(tmp_path / "rock.glb", _lod_files(cfg))
    left = {"rock_lod1.glb", "rock_lod2.glb"} - {p.name for p in stale}
    assert sorted(left) == kept and all(p.name != "rock_lodx.glb" for p in stale)


def test_normal_map_switch_keeps_the_mesh_and_adds_or_removes_the_map(tmp_path):
    """texture.normal_map (on by default) writes normalTexture + TANGENT into a lit asset and its
    LOD, validator-clean; off removes both, and so does unlit shading (which ignores the map);
    the decimated mesh is the same either way."""
    import pygltflib

    ply = tmp_path / "ball.ply"
    save_ply(_two_colour_sphere(), ply)
    meshes = {}
    for on, shading in ((True, "lit"), (False, "lit"), (True, "unlit")):
        out = tmp_path / f"ball_{on}_{shading}.glb"
        r = runner.invoke(app, ["mesh", str(ply), "-o", str(out), "--preset", "draft", "--device", "cpu",
                                "--set", "mesh.grid=48", "--set", "texture.size=128",
                                "--set", "texture.bake_resolution=64", "--set", "texture.bake_views=6",
                                "--set", "mesh.triangles=600", "--set", "export.preview=false",
                                "--set", f"export.shading={shading}", "--lods", "1",
                                "--set", f"texture.normal_map={str(on).lower()}"])
        assert r.exit_code == 0, r.output
        has = on and shading == "lit"
        for p in (out, out.with_name(out.stem + "_lod1.glb")):
            _assert_valid_glb(p)
            g = pygltflib.GLTF2().load(str(p))
            prim = g.meshes[0].primitives[0]
            assert (g.materials[0].normalTexture is not None) == has
            assert (prim.attributes.TANGENT is not None) == has
            assert len(g.images) == (2 if has else 1)
        g = pygltflib.GLTF2().load(str(out))
        pos = g.accessors[g.meshes[0].primitives[0].attributes.POSITION]
        meshes[on, shading] = (pos.count, pos.min, pos.max, g.accessors[g.meshes[0].primitives[0].indices].count)
    assert meshes[True, "lit"] == meshes[False, "lit"] == meshes[True, "unlit"]
