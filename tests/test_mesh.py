"""Stage 2a as a whole (the default fusion surface): closed, outward, decimated, cleaned, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from tdgen.config import MeshConfig
from tdgen.errors import GenerationError
from tdgen.mesh import extract_mesh
from tdgen.testing.splats import cat, fibonacci_sphere, isotropic


FAST = dict(method="fusion", views=24, view_resolution=96)
"""CPU-sized fusion for tests."""


@pytest.fixture(scope="module")
def sphere_mesh():
    # A hollow shell of small splats, like a stage-1 result: the visible surface is the shell.
    g = isotropic(fibonacci_sphere(8000, 0.5), sigma=0.01, opacity=0.95)
    return extract_mesh(g, MeshConfig(**FAST, grid=80, triangles=5000), "cpu")


def test_sphere_is_watertight_round_and_outward(sphere_mesh):
    m = sphere_mesh
    assert m.vertices.dtype == np.float32 and m.faces.dtype == np.int64
    assert m.normals.dtype == np.float32 and m.uvs is None
    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    # closed: no boundary edge (the decimator may pinch two sheets onto one edge at a dent)
    _, uses = np.unique(tm.edges_sorted, axis=0, return_counts=True)
    assert (uses % 2 == 0).all()
    radius = np.linalg.norm(m.vertices, axis=1)
    # On the visible surface: where a radial ray's alpha reaches mesh.blob_alpha (0.3), about
    # 1.5-2 sigma outside the centres for these 0.95-opacity blobs; not at the centres, not 3 sigma out.
    assert 0.5 + 0.5 * 0.01 < np.median(radius) < 0.5 + 2.5 * 0.01
    assert np.percentile(radius, 99) - np.percentile(radius, 1) < 0.04
    # One closed outer surface: the inner wall of the hollow shell was filled away.
    assert len(trimesh.graph.connected_components(tm.face_adjacency)) == 1
    # CCW seen from outside: face normals point away from the centre, volume positive.
    assert (np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center) > 0).mean() > 0.99
    assert tm.volume > 0
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", m.normals, m.vertices) > 0).mean() > 0.99


def test_decimation_meets_triangle_budget(sphere_mesh):
    assert 4000 <= sphere_mesh.num_faces <= 5000
    g = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    small = extract_mesh(g, MeshConfig(**FAST, grid=48, triangles=300), "cpu")
    assert 150 <= small.num_faces <= 300
    _, uses = np.unique(trimesh.Trimesh(small.vertices, small.faces, process=False).edges_sorted, axis=0,
                        return_counts=True)
    assert (uses % 2 == 0).all()


def test_min_component_drops_small_far_blob():
    shell = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    # ~0.06 in radius: about 1 % of the shell's faces, below the 2 % cut.
    # close enough to count as part of the object, not as a stray floater
    blob = isotropic(fibonacci_sphere(8, 0.01, centre=(0.72, 0.0, 0.0)), sigma=0.03, opacity=0.9)
    g = cat(shell, blob)
    kept = extract_mesh(g, MeshConfig(**FAST, grid=64, triangles=100_000, min_component=0.0), "cpu")
    assert (kept.vertices[:, 0] > 0.64).any()
    dropped = extract_mesh(g, MeshConfig(**FAST, grid=64, triangles=100_000, min_component=0.02), "cpu")
    assert not (dropped.vertices[:, 0] > 0.64).any()
    assert np.linalg.norm(dropped.vertices, axis=1).max() < 0.6


def test_far_floaters_do_not_shrink_the_object():
    """A captured scene's stray splats far away (and a few huge ones) must not set the lattice:
    the object keeps its resolution and its radius."""
    shell = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    floaters = isotropic(np.array([[20.0, 0.0, 0.0], [0.0, -15.0, 3.0]]), sigma=0.05, opacity=0.99)
    huge = isotropic(np.array([[0.0, 0.0, 0.0]]), sigma=5.0, opacity=0.02)  # faint, but enormous
    mesh = extract_mesh(cat(cat(shell, floaters), huge), MeshConfig(**FAST, grid=64, triangles=100_000), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.max() < 0.6
    # the shell's visible surface (0.5 to 2 sigma outside the centres), at full resolution
    assert 0.5 + 0.5 * 0.02 < r.mean() < 0.5 + 2.0 * 0.02
    assert mesh.num_faces > 2000


def test_empty_splat_raises_generation_error():
    g = isotropic(fibonacci_sphere(100, 0.5), sigma=0.02, opacity=0.001)
    with pytest.raises(GenerationError, match="min_opacity"):
        extract_mesh(g, MeshConfig(grid=32), "cpu")
    # opacities above min_opacity but too faint for any view to see a surface
    g = isotropic(fibonacci_sphere(100, 0.5), sigma=0.02, opacity=0.01)
    with pytest.raises(GenerationError, match=r"lower mesh\.blob_alpha"):  # blobs: see test below
        extract_mesh(g, MeshConfig(**FAST, grid=32), "cpu")


def test_progress_reports_grid_and_mesh_stages():
    events = []
    g = isotropic(fibonacci_sphere(2000, 0.5), sigma=0.03, opacity=0.9)
    extract_mesh(g, MeshConfig(**FAST, grid=32, triangles=500), "cpu", on_progress=events.append)
    stages = [e.stage for e in events]
    assert "grid" in stages and stages[-1] == "mesh"
    assert events[-1].step == events[-1].total




def test_auto_is_fusion_at_the_level_of_the_splats_kind():
    """Flat surfels are read at mesh.alpha, blobs at mesh.blob_alpha: a level the splat never
    reaches fails naming the setting that applies, the other setting changes nothing."""
    flat = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.3)
    flat.scales[:, 2] = math.log(0.002)  # discs (orientation does not matter for the choice)
    blobs = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.3)
    small = dict(FAST, method="auto", grid=32, triangles=500)
    events = []
    for g in (flat, blobs):
        extract_mesh(g, MeshConfig(**small), "cpu", on_progress=events.append)
    assert [e.message for e in events if e.message.startswith("surface by")] == ["surface by fusion"] * 2
    extract_mesh(flat, MeshConfig(**small, blob_alpha=0.95), "cpu")
    extract_mesh(blobs, MeshConfig(**small, alpha=0.95), "cpu")
    with pytest.raises(GenerationError, match=r"lower mesh\.alpha"):
        extract_mesh(flat, MeshConfig(**small, alpha=0.95), "cpu")
    with pytest.raises(GenerationError, match=r"lower mesh\.blob_alpha"):
        extract_mesh(blobs, MeshConfig(**small, blob_alpha=0.95), "cpu")


def test_unpinch_closes_two_sheets_pressed_onto_one_edge():
    """Two subdivided boxes touching along one edge (four faces on each of its edges, as a
    decimator's collapse leaves a thin part): cut out and capped, one closed outward surface."""
    from tdgen.mesh import _manifold_edges, _unpinch

    a = trimesh.creation.box(extents=(1, 1, 1)).subdivide().subdivide()
    b = a.copy()
    a.apply_translation((0.5, 0.5, 0))
    b.apply_translation((-0.5, -0.5, 0))  # shares the edge x = y = 0 with a
    both = trimesh.util.concatenate([a, b])
    both.merge_vertices()
    v, f = np.asarray(both.vertices, np.float32), np.asarray(both.faces, np.int64)
    assert not _manifold_edges(v, f)
    v2, f2 = _unpinch(v, f)
    assert _manifold_edges(v2, f2)
    tm = trimesh.Trimesh(v2, f2, process=True)
    assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0
    assert abs(tm.volume - 2.0) < 0.1  # only the pinch's neighbourhood was recut
    assert len(f) - 200 < len(f2) < len(f)


def test_the_alpha_level_moves_with_flatness_between_the_two_ratios():
    """Discs (shortest/longest axis ≤ mesh.FLAT_RATIO) are read at mesh.alpha, blobs (≥
    mesh.BLOB_RATIO, as photometric fits' 0.24 are) at mesh.blob_alpha, linearly between: two
    nearly alike splats never get levels far apart."""
    from tdgen.mesh import BLOB_RATIO, FLAT_RATIO, _alpha_level, _blobbiness, _smoothing_passes

    cfg = MeshConfig(alpha=0.5, blob_alpha=0.3, smooth=30)
    levels, passes = [], []
    for ratio in (0.02, FLAT_RATIO, 0.7 * FLAT_RATIO + 0.3 * BLOB_RATIO, BLOB_RATIO, 0.24, 1.0):
        g = isotropic(fibonacci_sphere(500, 0.5), sigma=0.02, opacity=0.9)
        g.scales[:, 2] = math.log(0.02 * ratio)
        levels.append(_alpha_level(_blobbiness(g), cfg))
        passes.append(_smoothing_passes(_blobbiness(g), cfg))
    assert [k for k, _ in levels] == ["alpha"] * 3 + ["blob_alpha"] * 3
    assert [round(a, 3) for _, a in levels] == [0.5, 0.5, 0.44, 0.3, 0.3, 0.3]
    assert passes == [0, 0, 9, 30, 30, 30]  # flat surfels' slab edges stay sharp


def _lumpy_box(wavelength: float = 0.1, amplitude: float = 0.02):
    """A 0.8 m box of 0.95-opacity blobs whose top is corrugated (the voxel-scale lumps fusion
    leaves on a fitted splat's flat faces, made larger so the test sees them)."""
    s = np.linspace(-0.4, 0.4, 41)
    a, b = (x.ravel() for x in np.meshgrid(s, s))
    faces = []
    for axis in range(3):
        for sign in (-1, 1):
            p = np.zeros((len(a), 3))
            u, w = (i for i in range(3) if i != axis)
            p[:, u], p[:, w], p[:, axis] = a, b, sign * 0.4
            if axis == 1 and sign == 1:
                p[:, 1] += amplitude * np.sin(2 * np.pi * a / wavelength) * np.sin(2 * np.pi * b / wavelength)
            faces.append(p)
    return isotropic(np.concatenate(faces), sigma=0.015, opacity=0.95)


def test_taubin_smoothing_flattens_lumps_without_shrinking():
    """mesh.smooth: the lumps of a flat face lose at least a third of their height, the face
    stays where it was (Taubin's shrink-free pass, not a Laplacian one), and the mesh stays
    closed with its volume."""
    g = _lumpy_box()
    out = {}
    for k in (0, 30):
        m = extract_mesh(g, MeshConfig(**FAST, grid=48, triangles=20_000, smooth=k), "cpu")
        v = m.vertices
        top = v[(v[:, 1] > 0.3) & (np.abs(v[:, 0]) < 0.3) & (np.abs(v[:, 2]) < 0.3), 1]
        tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
        assert tm.is_watertight
        out[k] = (top.std(), top.mean(), tm.volume)
    assert out[30][0] < 0.67 * out[0][0]
    assert abs(out[30][1] - out[0][1]) < 0.001
    assert abs(out[30][2] / out[0][2] - 1) < 0.01
