"""Collision shapes: one hull or a convex decomposition, written as engine-named nodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pygltflib
import pytest
import trimesh

from tdgen.collision import MAX_HULL_VERTICES, collision_shapes
from tdgen.config import ExportConfig
from tdgen.export import collision_node_name, export_glb
from tdgen.meshdata import Mesh


def _mesh(tm: trimesh.Trimesh) -> Mesh:
    return Mesh(np.asarray(tm.vertices, np.float32), np.asarray(tm.faces, np.int64),
                np.asarray(tm.vertex_normals, np.float32), None)


@pytest.fixture(scope="module")
def two_posts() -> Mesh:
    """Two 0.2 × 1 × 0.2 boxes 0.6 apart: their one hull holds the gap, a decomposition not."""
    a = trimesh.creation.box((0.2, 1.0, 0.2))
    a.apply_translation((-0.4, 0.5, 0.0))
    b = trimesh.creation.box((0.2, 1.0, 0.2))
    b.apply_translation((0.4, 0.5, 0.0))
    return _mesh(trimesh.util.concatenate([a, b]))


def _is_convex_outward(v: np.ndarray, f: np.ndarray) -> bool:
    tm = trimesh.Trimesh(v, f, process=False)
    if not tm.is_watertight or tm.volume <= 0:
        return False
    n = tm.face_normals
    d = np.einsum("ij,ij->i", n, v[f[:, 0]])
    return bool(((v @ n.T) - d <= 1e-4).all())  # every vertex behind every face plane


def test_none_writes_no_shapes(two_posts):
    assert collision_shapes(two_posts, ExportConfig()) == []


def test_hull_bounds_the_whole_mesh(two_posts):
    (v, f), = collision_shapes(two_posts, ExportConfig(collision="hull"))
    assert _is_convex_outward(v, f)
    vol = trimesh.Trimesh(v, f).volume
    assert vol == pytest.approx(1.0 * 0.2 * 1.0, rel=1e-3)  # spans both posts and the gap


def test_hull_of_a_dense_mesh_is_capped_in_vertices():
    sphere = _mesh(trimesh.creation.icosphere(subdivisions=4))  # 2562 vertices on the hull
    (v, f), = collision_shapes(sphere, ExportConfig(collision="hull"))
    assert len(v) <= MAX_HULL_VERTICES and _is_convex_outward(v, f)
    assert trimesh.Trimesh(v, f).volume > 0.85 * (4 / 3 * np.pi)  # still nearly the ball


def test_convex_decomposition_separates_the_posts(two_posts):
    pieces = collision_shapes(two_posts, ExportConfig(collision="convex"))
    assert len(pieces) >= 2
    assert all(_is_convex_outward(v, f) and len(v) <= MAX_HULL_VERTICES for v, f in pieces)
    total = sum(trimesh.Trimesh(v, f).volume for v, f in pieces)
    assert total < 0.6 * 0.2  # the two posts are 0.08 m³; their single hull is 0.2
    xs = sorted(float(v[:, 0].mean()) for v, _ in pieces)
    assert xs[0] < -0.2 and xs[-1] > 0.2  # one piece on each post


def test_collision_hulls_caps_the_decomposition(two_posts):
    pieces = collision_shapes(two_posts, ExportConfig(collision="convex", collision_hulls=1))
    assert len(pieces) == 1


@pytest.mark.parametrize("convention, expected", [("godot", "post_col01-convcolonly"),
                                                  ("unreal", "UCX_post_01")])
def test_collision_nodes_are_named_for_the_engine(tmp_path, two_posts, convention, expected):
    from tdgen.testing.gltf_validator import validate_glb, validator_available

    uv = np.zeros((two_posts.num_vertices, 2), np.float32)
    mesh = dataclasses.replace(two_posts, uvs=uv)
    cfg = ExportConfig(collision="convex", collision_names=convention, preview=False)
    pieces = collision_shapes(mesh, cfg)
    out = tmp_path / "post.glb"
    res = export_glb(mesh, np.zeros((4, 4, 3), np.float32), cfg, out, collision=pieces)
    assert res.collision_hulls == len(pieces) >= 2
    g = pygltflib.GLTF2().load(str(out))
    names = [n.name for n in g.nodes]
    assert names[0] == "post" and expected in names
    assert names[1:] == [collision_node_name("post", k, convention) for k in range(len(pieces))]
    assert g.scenes[0].nodes == list(range(len(names)))
    # Placed like the render mesh: the colliders stand on the ground, 1 m tall.
    lo = min(g.accessors[g.meshes[k].primitives[0].attributes.POSITION].min[1]
             for k in range(1, len(g.meshes)))
    hi = max(g.accessors[g.meshes[k].primitives[0].attributes.POSITION].max[1]
             for k in range(1, len(g.meshes)))
    assert lo == pytest.approx(0.0, abs=0.02) and hi == pytest.approx(1.0, abs=0.02)
    if validator_available():
        report = validate_glb(out)
        assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]
