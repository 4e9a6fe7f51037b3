"""The .glb export: Khronos-valid, placed and scaled, PBR/unlit material, LODs, atomic writes."""

from __future__ import annotations

import errno
import os

import numpy as np
import pygltflib
import pytest
import torch
import trimesh

import tdgen.export as export_mod
from tdgen.config import ExportConfig, TextureConfig
from tdgen.errors import GenerationError, WriteError
from tdgen.export import decimate_keep_uvs, export_glb, lod_path
from tdgen.io import TEMP_PREFIX
from tdgen.mesh import vertex_normals
from tdgen.meshdata import Mesh
from tdgen.testing.gltf_validator import validate_glb, validator_available
from tdgen.unwrap import unwrap_mesh

TEX = 64


def validate(path) -> dict:
    """Khronos report; skipped locally without Node/npm, but CI must run it."""
    if not validator_available():
        if os.environ.get("CI"):
            pytest.fail("gltf-validator is missing in CI; run `npm ci` in the repository root")
        pytest.skip("gltf-validator not installed (npm ci)")
    return validate_glb(path)


@pytest.fixture(scope="module")
def uv_mesh() -> Mesh:
    # An off-centre, squashed ball so the re-centring and scaling have work to do.
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v = (np.asarray(s.vertices) * [1.0, 0.6, 0.8] + [3.0, -2.0, 1.0]).astype(np.float32)
    f = np.asarray(s.faces, dtype=np.int64)
    return unwrap_mesh(Mesh(v, f, vertex_normals(v, f)), TextureConfig(size=TEX, padding=2))


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((TEX, TEX, 3)).astype(np.float32)


def _gltf(path) -> pygltflib.GLTF2:
    return pygltflib.GLTF2().load_binary(str(path))


@pytest.mark.parametrize("shading", ["unlit", "lit"])
def test_glb_is_valid_and_well_formed(tmp_path, uv_mesh, texture, shading):
    out = tmp_path / "red_chair.glb"
    cfg = ExportConfig(height=1.7, shading=shading, lods=2)
    res = export_glb(uv_mesh, texture, cfg, out)
    assert res.paths == [out, lod_path(out, 1), lod_path(out, 2)]
    assert res.paths[1].name == "red_chair_lod1.glb"
    assert (res.triangles, res.vertices) == (uv_mesh.num_faces, uv_mesh.num_vertices)
    assert res.texture_size == TEX and res.height == 1.7

    for p in res.paths:
        report = validate(p)
        assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]

        g = _gltf(p)
        assert g.asset.generator.startswith("tdgen ")
        assert len(g.scenes) == 1 and g.scene == 0 and g.scenes[0].nodes == [0]
        (node,) = g.nodes
        assert node.matrix is None and node.translation is None
        assert node.rotation is None and node.scale is None
        assert node.name == g.meshes[0].name == p.stem
        (mat,) = g.materials
        pbr = mat.pbrMetallicRoughness
        assert pbr.metallicFactor == 0.0 and pbr.roughnessFactor == pytest.approx(0.9)
        assert pbr.baseColorTexture.index == 0 and mat.doubleSided is False
        if shading == "unlit":
            assert g.extensionsUsed == ["KHR_materials_unlit"]
            assert "KHR_materials_unlit" in mat.extensions
        else:
            assert not g.extensionsUsed and not mat.extensions
        assert not g.extensionsRequired
        (sampler,) = g.samplers
        assert (sampler.magFilter, sampler.minFilter) == (9729, 9987)
        assert (sampler.wrapS, sampler.wrapT) == (10497, 10497)
        assert g.accessors[g.meshes[0].primitives[0].indices].componentType == 5123  # uint16
        assert g.buffers[0].byteLength % 4 == 0
        assert all(v.byteOffset % 4 == 0 for v in g.bufferViews)


def test_reloads_with_uvs_texture_and_placement(tmp_path, uv_mesh, texture):
    out = tmp_path / "asset.glb"
    export_glb(uv_mesh, texture, ExportConfig(height=2.5), out)
    scene = trimesh.load(out)
    (geom,) = scene.geometry.values()
    assert len(geom.faces) == uv_mesh.num_faces
    assert geom.visual.uv is not None and len(geom.visual.uv) == len(geom.vertices)
    image = geom.visual.material.baseColorTexture
    assert image.size == (TEX, TEX)
    # Pixels come back as written: row 0 is the top of the image, no flip.
    expected = np.round(texture * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected)

    lo, hi = geom.bounds
    assert lo[1] == pytest.approx(0.0, abs=1e-6)
    assert hi[1] - lo[1] == pytest.approx(2.5, rel=1e-5)
    assert (lo[0] + hi[0]) / 2 == pytest.approx(0.0, abs=1e-5)
    assert (lo[2] + hi[2]) / 2 == pytest.approx(0.0, abs=1e-5)
    # Uniform scale: the squashed ball keeps its 1 : 0.6 : 0.8 proportions.
    ext = hi - lo
    assert ext[0] / ext[1] == pytest.approx(1 / 0.6, rel=1e-3)
    assert ext[2] / ext[1] == pytest.approx(0.8 / 0.6, rel=1e-3)
    # Winding kept: still CCW from outside after export.
    tm = trimesh.Trimesh(geom.vertices, geom.faces, process=False)
    tm.merge_vertices(merge_tex=True, merge_norm=True)
    assert tm.is_watertight and tm.volume > 0


def test_texture_formats_give_identical_files(tmp_path, uv_mesh, texture):
    as_uint8 = np.round(texture * 255).astype(np.uint8)
    paths = []
    for i, tex in enumerate([texture, torch.from_numpy(texture), as_uint8]):
        paths.append(tmp_path / f"a{i}" / "x.glb")
        export_glb(uv_mesh, tex, ExportConfig(), paths[-1])
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    with pytest.raises(ValueError, match="power of two"):
        export_glb(uv_mesh, np.zeros((48, 48, 3), np.float32), ExportConfig(), tmp_path / "bad.glb")
    assert not (tmp_path / "bad.glb").exists()


def test_lods_halve_triangles_and_keep_uvs_exact(uv_mesh):
    lod = decimate_keep_uvs(uv_mesh, uv_mesh.num_faces // 2)
    assert lod.num_faces <= uv_mesh.num_faces // 2 + 2
    assert lod.num_faces >= uv_mesh.num_faces // 4
    # Every kept vertex carries its own (position, normal, uv) from the input unchanged.
    base = {tuple(r) for r in np.hstack([uv_mesh.vertices, uv_mesh.normals, uv_mesh.uvs])}
    assert all(tuple(r) in base for r in np.hstack([lod.vertices, lod.normals, lod.uvs]))
    # Seams held fixed: welded by position, the LOD is still closed (no cracks) and outward.
    tm = trimesh.Trimesh(lod.vertices, lod.faces, process=False)
    tm.merge_vertices(merge_tex=True, merge_norm=True)
    assert tm.is_watertight and tm.volume > 0


def test_large_meshes_use_uint32_indices(tmp_path):
    n = 70_000 // 3 * 3  # > 65535 vertices: disjoint triangles
    rng = np.random.default_rng(1)
    corners = rng.random((n // 3, 1, 3)) + rng.random((n // 3, 3, 3)) * 0.01
    v = corners.reshape(-1, 3).astype(np.float32)
    f = np.arange(n, dtype=np.int64).reshape(-1, 3)
    m = Mesh(v, f, vertex_normals(v, f), rng.random((n, 2)).astype(np.float32))
    out = tmp_path / "big.glb"
    export_glb(m, np.zeros((16, 16, 3), np.float32), ExportConfig(), out)
    g = _gltf(out)
    assert g.accessors[g.meshes[0].primitives[0].indices].componentType == 5125  # uint32


def test_failing_write_leaves_nothing(tmp_path, uv_mesh, texture, monkeypatch):
    def broken_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    out = tmp_path / "asset.glb"
    # one line naming the file and the fix, not the OSError's traceback
    with pytest.raises(WriteError, match=r"cannot write .*asset\.glb \(No space left on device\); free some disk space"):
        export_glb(uv_mesh, texture, ExportConfig(), out)
    assert list(tmp_path.iterdir()) == []

    # A failure while building an LOD happens before any file is written.
    monkeypatch.undo()

    def broken_lod(mesh, target):
        raise RuntimeError("boom")

    monkeypatch.setattr(export_mod, "decimate_keep_uvs", broken_lod)
    with pytest.raises(RuntimeError, match="boom"):
        export_glb(uv_mesh, texture, ExportConfig(lods=1), out)
    assert not any(p.name.startswith(TEMP_PREFIX) or p.suffix == ".glb" for p in tmp_path.iterdir())


def test_flat_mesh_is_a_generation_error(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1]], np.int64)
    m = Mesh(v, f, vertex_normals(v, f), np.zeros((3, 2), np.float32))
    with pytest.raises(GenerationError, match="no height"):
        export_glb(m, np.zeros((16, 16, 3), np.float32), ExportConfig(), tmp_path / "flat.glb")


def test_validator_catches_a_broken_file(tmp_path, uv_mesh, texture):
    out = tmp_path / "asset.glb"
    export_glb(uv_mesh, texture, ExportConfig(), out)
    g = _gltf(out)
    g.accessors[0].max = [9.0, 9.0, 9.0]  # positions' max no longer matches the data
    broken = tmp_path / "broken.glb"
    g.save_binary(str(broken))
    report = validate(broken)
    assert report["numErrors"] > 0
    assert any(m["code"] == "ACCESSOR_MAX_MISMATCH" for m in report["messages"])


@pytest.mark.parametrize("shading", ["lit", "unlit"])
def test_normal_map_adds_normal_texture_and_tangents(tmp_path, uv_mesh, texture, shading):
    """A normal map is the material's normalTexture (its own image, texCoord 0) with TANGENT on
    the primitive (unit xyz ⟂ NORMAL, w = ±1), validator-clean; LODs made by the caller carry
    their own; without one neither appears."""
    from tdgen.normalmap import vertex_tangents

    normal = np.full((TEX, TEX, 3), [0.5, 0.5, 1.0], np.float32)
    normal[:, : TEX // 2, 0] = 0.7  # something to see: not the flat colour everywhere
    out = tmp_path / "rock.glb"
    lod = unwrap_mesh(decimate_keep_uvs(uv_mesh, uv_mesh.num_faces // 2), TextureConfig(size=TEX))
    export_glb(uv_mesh, texture, ExportConfig(shading=shading, lods=1), out,
               lods=[(lod, texture, normal)], normal_map=normal)
    for p, m in ((out, uv_mesh), (lod_path(out, 1), lod)):
        report = validate(p)
        assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]
        g = _gltf(p)
        (mat,) = g.materials
        assert mat.normalTexture.index == 1 and mat.normalTexture.texCoord == 0
        assert g.textures[1].source == 1 and g.images[1].mimeType == "image/png"
        prim = g.meshes[0].primitives[0]
        a = g.accessors[prim.attributes.TANGENT]
        assert (a.type, a.componentType, a.count) == ("VEC4", 5126, m.num_vertices)
        blob = g.binary_blob()
        view = g.bufferViews[a.bufferView]
        t = np.frombuffer(blob[view.byteOffset:view.byteOffset + view.byteLength], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(t, vertex_tangents(m), atol=1e-4)  # placement keeps directions
        from io import BytesIO

        from PIL import Image

        iv = g.bufferViews[g.images[1].bufferView]
        img = np.asarray(Image.open(BytesIO(blob[iv.byteOffset:iv.byteOffset + iv.byteLength])))
        np.testing.assert_array_equal(img, np.round(normal * 255).astype(np.uint8))

    plain = tmp_path / "plain.glb"
    export_glb(uv_mesh, texture, ExportConfig(shading=shading), plain)
    g = _gltf(plain)
    assert g.materials[0].normalTexture is None and len(g.images) == 1 and len(g.textures) == 1
    assert g.meshes[0].primitives[0].attributes.TANGENT is None


def _hull(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    h = trimesh.convex.convex_hull(mesh.vertices)
    return np.asarray(h.vertices, np.float32), np.asarray(h.faces, np.int64)


def _level_faces(g: pygltflib.GLTF2, node) -> int:
    return g.accessors[g.meshes[node.mesh].primitives[0].indices].count // 3


def _level_bounds(g: pygltflib.GLTF2, node) -> tuple[list, list]:
    a = g.accessors[g.meshes[node.mesh].primitives[0].attributes.POSITION]
    return a.min, a.max


@pytest.mark.parametrize("layout", ["nodes", "msft_lod"])
def test_single_file_lod_layouts(tmp_path, uv_mesh, texture, layout):
    """One validator-clean file holding every level, each with its own mesh, material and
    textures (normal map included), placed alike, halving triangles; the collider stays a root
    node named for the engine. `nodes`: a parent NAME (extras fbx_type LodGroup) whose children
    are NAME_LOD0…; `msft_lod`: LOD0 is the only render root and lists the others, with a
    decreasing MSFT_screencoverage ending at 0, declared used but not required."""
    normal = np.full((TEX, TEX, 3), [0.5, 0.5, 1.0], np.float32)
    lod1 = unwrap_mesh(decimate_keep_uvs(uv_mesh, uv_mesh.num_faces // 2), TextureConfig(size=TEX))
    lod2 = unwrap_mesh(decimate_keep_uvs(lod1, lod1.num_faces // 2), TextureConfig(size=TEX))
    out = tmp_path / "rock.glb"
    cfg = ExportConfig(shading="lit", lods=2, lod_layout=layout, collision="hull")
    res = export_glb(uv_mesh, texture, cfg, out, lods=[(lod1, texture, normal), (lod2, texture, normal)],
                     collision=[_hull(uv_mesh)], normal_map=normal)
    assert res.paths == [out] and sorted(p.name for p in tmp_path.iterdir()) == ["rock.glb"]
    report = validate(out)
    assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]

    g = _gltf(out)
    assert not g.extensionsRequired
    by_name = {n.name: i for i, n in enumerate(g.nodes)}
    roots = g.scenes[0].nodes
    assert [g.nodes[i].name for i in roots] == ["rock", "rock_col00-convcolonly"]
    if layout == "nodes":
        parent = g.nodes[by_name["rock"]]
        assert parent.mesh is None and parent.extras == {"fbx_type": "LodGroup"}
        levels = [g.nodes[i] for i in parent.children]
        assert [n.name for n in levels] == ["rock_LOD0", "rock_LOD1", "rock_LOD2"]
        assert g.extensionsUsed == []
    else:
        lod0 = g.nodes[roots[0]]
        ids = lod0.extensions["MSFT_lod"]["ids"]
        levels = [lod0] + [g.nodes[i] for i in ids]
        assert [n.name for n in levels] == ["rock", "rock_LOD1", "rock_LOD2"]
        assert not set(ids) & set(roots)  # a loader without the extension draws LOD0 only
        cov = lod0.extras["MSFT_screencoverage"]
        assert len(cov) == 3 and cov[0] == 0.5 and cov[-1] == 0.0 and cov == sorted(cov, reverse=True)
        assert g.extensionsUsed == ["MSFT_lod"]
    assert all(n.matrix is None and n.translation is None and n.scale is None for n in g.nodes)
    assert [_level_faces(g, n) for n in levels] == [uv_mesh.num_faces, lod1.num_faces, lod2.num_faces]
    assert uv_mesh.num_faces > lod1.num_faces > lod2.num_faces
    # Its own material, base colour and normal texture per level, and its own tangents.
    prims = [g.meshes[n.mesh].primitives[0] for n in levels]
    mats = [g.materials[p.material] for p in prims]
    assert len({p.material for p in prims}) == 3
    assert len({g.textures[m.pbrMetallicRoughness.baseColorTexture.index].source for m in mats}) == 3
    assert len({g.textures[m.normalTexture.index].source for m in mats}) == 3
    assert all(p.attributes.TANGENT is not None for p in prims)
    # Placed alike: the coarser levels sit in LOD0's box, centred on the same vertical axis
    # (decimating a 1280-triangle ball to a quarter rounds its poles off by up to 10 %).
    (lo0, hi0), *rest = [_level_bounds(g, n) for n in levels]
    assert lo0[1] == pytest.approx(0.0, abs=1e-6) and hi0[1] == pytest.approx(1.0, rel=1e-5)
    for lo, hi in rest:
        assert np.all(np.asarray(lo) >= np.asarray(lo0) - 1e-5) and np.all(np.asarray(hi) <= np.asarray(hi0) + 1e-5)
        assert hi[1] - lo[1] > 0.85
        np.testing.assert_allclose((np.add(lo, hi) / 2)[[0, 2]], (np.add(lo0, hi0) / 2)[[0, 2]], atol=0.02)


def test_a_loader_without_msft_lod_sees_lod0_and_the_collider(tmp_path, uv_mesh, texture):
    """trimesh knows no MSFT_lod: it builds the scene from the roots, so the file reads as the
    full asset plus its collider; the same levels in the `nodes` layout read as all of them."""
    counts = {}
    for layout in ("msft_lod", "nodes"):
        out = tmp_path / layout / "rock.glb"
        export_glb(uv_mesh, texture, ExportConfig(lods=2, lod_layout=layout, collision="hull"), out,
                   collision=[_hull(uv_mesh)])
        scene = trimesh.load(out)
        counts[layout] = sorted(len(geom.faces) for geom in scene.dump())
    hull_faces = len(_hull(uv_mesh)[1])
    assert counts["msft_lod"] == sorted([uv_mesh.num_faces, hull_faces])
    assert len(counts["nodes"]) == 4 and max(counts["nodes"]) == uv_mesh.num_faces


def test_layouts_without_lods_write_the_plain_file(tmp_path, uv_mesh, texture):
    """With export.lods = 0 every layout writes the same single-node file."""
    data = []
    for layout in ("files", "nodes", "msft_lod"):
        out = tmp_path / layout / "rock.glb"
        export_glb(uv_mesh, texture, ExportConfig(lod_layout=layout), out)
        data.append(out.read_bytes())
    assert data[0] == data[1] == data[2]
    assert [n.name for n in _gltf(tmp_path / "nodes" / "rock.glb").nodes] == ["rock"]
