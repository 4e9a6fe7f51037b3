"""Depth fusion (the default splat → surface): flat surfels, thin parts, pinholes, haze, scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from tdgen.config import MeshConfig
from tdgen.fusion import fuse_depth, sphere_directions
from tdgen.gaussians import Gaussians, normalize_splat
from tdgen.mesh import extract_mesh
from tdgen.testing.splats import cat

# CPU-sized fusion: coarse, few views, yet ~2 pixels per voxel like the presets.
FAST = dict(method="fusion", grid=48, views=32, view_resolution=112, triangles=4000)


def surfels(points: np.ndarray, normals: np.ndarray, spacing: float, opacity: float = 0.95,
            flatness: float = 0.1) -> Gaussians:
    """Discs in the tangent plane: in-plane std-dev `spacing`, normal std-dev `flatness` of it —
    the shape trained 3DGS splats converge to (a density iso-surface shreds them)."""
    from scipy.spatial.transform import Rotation

    n = len(points)
    helper = np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(normals, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(normals, t1)
    quats = Rotation.from_matrix(np.stack([t1, t2, normals], axis=2)).as_quat(scalar_first=True)
    return Gaussians(
        means=torch.tensor(points, dtype=torch.float32),
        scales=torch.tensor(np.log([spacing, spacing, flatness * spacing]), dtype=torch.float32).repeat(n, 1),
        quats=torch.tensor(quats, dtype=torch.float32),
        opacities=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh0=torch.zeros(n, 3),
        shN=torch.zeros(n, 0, 3),
    )


def on_mesh(tm: trimesh.Trimesh, n: int, seed: int = 0) -> Gaussians:
    pts, fidx = trimesh.sample.sample_surface_even(tm, n, seed=seed)
    return surfels(pts, tm.face_normals[fidx], spacing=math.sqrt(tm.area / len(pts)))


def welded(mesh) -> trimesh.Trimesh:
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    tm.merge_vertices()
    return tm


def table() -> trimesh.Trimesh:
    """A 1 m table: a 4 cm top (1.7 voxels at grid 48) on four 4 cm legs."""
    parts = [trimesh.creation.box(extents=(1.0, 0.04, 0.6), transform=trimesh.transformations.translation_matrix((0, 0.22, 0)))]
    for x in (-0.42, 0.42):
        for z in (-0.22, 0.22):
            parts.append(trimesh.creation.box(
                extents=(0.04, 0.4, 0.04), transform=trimesh.transformations.translation_matrix((x, 0.0, z))))
    return trimesh.util.concatenate(parts)


@pytest.fixture(scope="module")
def table_mesh():
    tm = table()
    return tm, extract_mesh(on_mesh(tm, 12000), MeshConfig(**FAST), "cpu")


def test_flat_surfel_table_is_one_closed_outward_piece(table_mesh):
    _, mesh = table_mesh
    tm = welded(mesh)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0
    assert len(tm.split(only_watertight=False)) == 1


def test_thin_parts_survive_and_keep_their_size(table_mesh):
    """A 3-voxel top and 3-voxel legs are all there, about as thick as they are (not a
    splat-width fatter), and the surface sits on the reference."""
    ref, mesh = table_mesh
    voxel = 1.0 / (FAST["grid"] - 5)
    from scipy.spatial import cKDTree

    pts, _ = trimesh.sample.sample_surface(welded(mesh), 20000, seed=0)
    dense, _ = trimesh.sample.sample_surface(ref, 400_000, seed=1)  # ~1.5 mm apart
    dist, _ = cKDTree(dense).query(pts)
    assert np.median(dist) < 0.35 * voxel
    assert np.percentile(dist, 95) < 1.2 * voxel
    # every leg reaches the floor, and nothing is below it
    lo = mesh.vertices[:, 1].min()
    assert abs(lo - (-0.2)) < voxel
    for x in (-0.42, 0.42):
        for z in (-0.22, 0.22):
            near = (np.abs(mesh.vertices[:, 0] - x) < 0.05) & (np.abs(mesh.vertices[:, 2] - z) < 0.05)
            assert (mesh.vertices[near, 1] < -0.18).any(), f"leg at {x}, {z} is missing"
    # the top is ~4 cm thick: the vertical extent of the mesh at the top's centre
    col = (np.abs(mesh.vertices[:, 0]) < 0.1) & (np.abs(mesh.vertices[:, 2]) < 0.1)
    ys = mesh.vertices[col, 1]
    assert 0.04 - voxel < ys.max() - ys.min() < 0.04 + 1.5 * voxel


def test_density_method_shreds_the_same_surfels():
    """The reason fusion is the default: the density iso-surface of flat surfels is full of holes."""
    tm = table()
    g = on_mesh(tm, 12000)
    fused = welded(extract_mesh(g, MeshConfig(**FAST, min_component=0.0), "cpu"))
    assert len(fused.split(only_watertight=False)) == 1
    from tdgen.errors import GenerationError

    try:  # sampled at voxel centres, the thin discs' density mostly never reaches the iso-level
        dens = welded(extract_mesh(g, MeshConfig(**{**FAST, "method": "density"}, min_component=0.0), "cpu"))
    except GenerationError as e:
        assert "never reaches" in str(e)
    else:
        assert len(dens.split(only_watertight=False)) > 3


def test_sphere_of_surfels_radius_is_exact():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    mesh = extract_mesh(on_mesh(sphere, 15000), MeshConfig(**FAST), "cpu")
    voxel = 1.0 / (FAST["grid"] - 5)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(np.median(r) - 0.5) < 0.3 * voxel
    assert r.std() < 0.3 * voxel
    assert welded(mesh).is_watertight


def test_hollow_shell_with_pinholes_has_no_inner_wall():
    """Sparse surfels (gaps between them) on a sphere: views see through some gaps into the
    hollow inside, yet the result is one closed outer surface with no inward-facing wall."""
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    g = on_mesh(sphere, 2500)
    g.scales = g.scales + math.log(0.6)  # in-plane σ 0.6 of the spacing: holes between discs
    mesh = extract_mesh(g, MeshConfig(**FAST), "cpu")
    tm = welded(mesh)
    assert len(tm.split(only_watertight=False)) == 1
    # closed: no boundary edge (the decimator may pinch a dent's two sides onto one edge)
    edges, counts = np.unique(tm.edges_sorted, axis=0, return_counts=True)
    assert (counts % 2 == 0).all()
    # an inner wall would make it a thin shell of a fraction of the ball's volume
    assert tm.volume > 0.85 * (4 / 3) * math.pi * 0.5**3
    assert np.median(np.linalg.norm(mesh.vertices, axis=1)) > 0.48


def test_haze_and_floaters_are_not_geometry():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.4)
    obj = on_mesh(sphere, 8000)
    gen = torch.Generator().manual_seed(1)
    n = 3000  # faint haze filling the box around the object
    haze = Gaussians(
        means=(torch.rand(n, 3, generator=gen) - 0.5) * 1.2,
        scales=torch.full((n, 3), math.log(0.03)),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        opacities=torch.full((n,), math.log(0.03 / 0.97)),
        sh0=torch.zeros(n, 3),
        shN=torch.zeros(n, 0, 3),
    )
    # a small opaque floater beside it and far strays
    blob = on_mesh(trimesh.creation.icosphere(subdivisions=2, radius=0.03).apply_translation((0.55, 0.3, 0)), 200)
    strays = on_mesh(trimesh.creation.icosphere(subdivisions=2, radius=0.05).apply_translation((30, 0, 0)), 60)
    mesh = extract_mesh(cat(obj, haze, blob, strays), MeshConfig(**FAST), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    # haze in front of the surface pulls the front-layer depth a little (measured: max 0.454)
    assert r.max() < 0.47 and abs(np.median(r) - 0.4) < 0.02
    assert len(welded(mesh).split(only_watertight=False)) == 1


def test_open_bowl_keeps_its_inside():
    """A concavity the views see into (a bowl) stays open rather than filled."""

    def below_rim(radius: float, n: int, seed: int):  # surfels on a sphere's part with y < 0.1
        sphere = trimesh.creation.icosphere(subdivisions=4, radius=radius)
        pts, fidx = trimesh.sample.sample_surface_even(sphere, n, seed=seed)
        keep = pts[:, 1] < 0.1
        return pts[keep], sphere.face_normals[fidx][keep], math.sqrt(sphere.area / n)

    p, nrm, sp = below_rim(0.5, 10000, 0)
    q, qn, sq = below_rim(0.45, 10000, 1)
    # the inner wall's outside faces the cavity: its normals point to the centre
    g = cat(surfels(p, nrm, sp), surfels(q, -qn, sq))
    mesh = extract_mesh(g, MeshConfig(**FAST), "cpu")
    # at the centre the bowl is a 5 cm floor at y ≈ −0.45…−0.5, not filled up to the rim
    col = (np.abs(mesh.vertices[:, 0]) < 0.06) & (np.abs(mesh.vertices[:, 2]) < 0.06)
    assert mesh.vertices[col, 1].max() < -0.35, "the bowl's inside was filled"
    assert len(welded(mesh).split(only_watertight=False)) == 1


def open_box(wall: float = 0.07) -> tuple[trimesh.Trimesh, list[tuple[np.ndarray, np.ndarray]]]:
    """A crate 1 m wide, 0.6 m deep and 0.6 m tall (y from −0.3 to 0.3), open at the top, its
    walls `wall` thick: from most views its floor is hidden behind a wall; only views from near
    the top see it. Returns the five boxes' union as one mesh and their (lo, hi) corners."""
    W, D, H = 1.0, 0.6, 0.6
    boxes = [((-W / 2, 0, -D / 2), (W / 2, wall, D / 2)),
             ((-W / 2, 0, -D / 2), (-W / 2 + wall, H, D / 2)), ((W / 2 - wall, 0, -D / 2), (W / 2, H, D / 2)),
             ((-W / 2, 0, -D / 2), (W / 2, H, -D / 2 + wall)), ((-W / 2, 0, D / 2 - wall), (W / 2, H, D / 2))]
    boxes = [(np.asarray(lo) - (0, H / 2, 0), np.asarray(hi) - (0, H / 2, 0)) for lo, hi in boxes]
    parts = [trimesh.creation.box(extents=hi - lo, transform=trimesh.transformations.translation_matrix((lo + hi) / 2))
             for lo, hi in boxes]
    return trimesh.util.concatenate(parts), boxes


def open_box_surfels(wall: float = 0.07) -> Gaussians:
    """Surfels on `open_box(wall)`'s outer surface only (none strictly inside another box)."""
    tm, boxes = open_box(wall)
    pts, fidx = trimesh.sample.sample_surface_even(tm, 20000, seed=0)
    hidden = np.zeros(len(pts), bool)
    for lo, hi in boxes:
        hidden |= ((pts > lo + 1e-4) & (pts < hi - 1e-4)).all(1)
    return surfels(pts[~hidden], tm.face_normals[fidx][~hidden], math.sqrt(tm.area / len(pts)))


def test_deep_open_box_keeps_its_inside():
    """A crate's inside, seen into by a few views from above only (most views see its floor
    voxels far behind a wall), stays open down to the floor instead of filling up: the few
    views that see it free carve it (`FREE_VIEWS`), while pinholes stay closed (above)."""
    mesh = extract_mesh(open_box_surfels(), MeshConfig(**FAST), "cpu")
    v = mesh.vertices
    # the floor's top is at y = -0.3 + 0.07 = -0.23; a filled crate has its top at +0.3
    for x in (-0.3, 0.0, 0.3):
        col = (np.abs(v[:, 0] - x) < 0.05) & (np.abs(v[:, 2]) < 0.05)
        assert col.any() and v[col, 1].max() < -0.15, f"the crate's inside was filled at x={x}"
    assert len(welded(mesh).split(only_watertight=False)) == 1


def test_thin_walled_crate_floor_stays_at_its_height():
    """Voxels just in front of a surface that few views see (a crate's floor and inner walls,
    seen from above only) are free space as soon as two views see them in front of it, however
    close (`FREE_MARGIN`), and so are voxels that views see free only across depth edges (which
    cast no distance vote): with 4 cm walls (1.7 voxels) the floor used to come out 3 cm high."""
    wall = 0.04
    v = extract_mesh(open_box_surfels(wall), MeshConfig(**FAST), "cpu").vertices
    voxel = 1.05 / FAST["grid"]
    floor = (np.abs(v[:, 0]) < 0.2) & (np.abs(v[:, 2]) < 0.1) & (v[:, 1] < -0.3 + wall + 0.05)
    assert floor.any()
    assert abs(v[floor, 1].max() - (-0.3 + wall)) < voxel / 2, "the crate's floor moved up"


def test_scene_scale_and_offset_do_not_matter():
    """A captured splat in centimetres far from the origin meshes like the same splat in stage
    1's frame, once normalize_splat brings it there (what the pipeline does)."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    g = on_mesh(sphere, 6000)
    far = Gaussians(g.means * 250.0 + torch.tensor([1000.0, -40.0, 7.0]), g.scales + math.log(250.0),
                    g.quats, g.opacities, g.sh0, g.shN)
    a = extract_mesh(normalize_splat(g), MeshConfig(**FAST), "cpu")
    b = extract_mesh(normalize_splat(far), MeshConfig(**FAST), "cpu")
    ra, rb = np.linalg.norm(a.vertices, axis=1), np.linalg.norm(b.vertices, axis=1)
    assert abs(np.median(ra) - np.median(rb)) < 0.01
    assert abs(a.num_faces - b.num_faces) < 0.1 * a.num_faces


def test_normalize_splat_crops_and_ignores_floaters():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    g = on_mesh(sphere, 3000)
    strays = Gaussians(torch.tensor([[50.0, 0, 0], [0, -80.0, 0]]), torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2),
                       torch.full((2,), 5.0), torch.zeros(2, 3), torch.zeros(2, 0, 3))
    clean = normalize_splat(g)
    dirty = normalize_splat(cat(g, strays))
    r = float(clean.means.norm(dim=-1).median())
    assert 0.25 < r < 0.5  # the bulk's bounding box has a half-diagonal of 0.5
    assert float(dirty.means[: g.num].norm(dim=-1).median()) == pytest.approx(r, rel=0.01)
    assert float(dirty.means[: g.num].mean(0).norm()) < 0.02
    cropped = normalize_splat(g, ((0.0, -2.0, -2.0), (2.0, 2.0, 2.0)))  # the +x half
    assert cropped.num < 0.6 * g.num
    from tdgen.errors import InputError

    with pytest.raises(InputError, match="crop"):
        normalize_splat(g, ((5.0, 5.0, 5.0), (6.0, 6.0, 6.0)))


def test_sphere_directions_cover_the_sphere():
    el, az = sphere_directions(64)
    assert el[0] == pytest.approx(90.0) and el[-1] == pytest.approx(-90.0)
    d = np.stack([np.cos(np.radians(el)) * np.sin(np.radians(az)), np.sin(np.radians(el)),
                  np.cos(np.radians(el)) * np.cos(np.radians(az))], -1)
    assert np.linalg.norm(d.mean(0)) < 0.05  # balanced
    # every direction of a dense test set is within 20° of some view
    test = trimesh.creation.icosphere(subdivisions=3).vertices
    assert (test @ d.T).max(1).min() > math.cos(math.radians(20))


def test_field_sign_and_scale():
    """Positive inside, negative outside, clamped to ± truncation voxels."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    field, origin, voxel = fuse_depth(on_mesh(sphere, 6000), 32, 24, 96, 3.0, 0.5)
    assert field.shape == (32, 32, 32)
    c = ((torch.zeros(3) - origin) / voxel).round().long()
    assert field[c[0], c[1], c[2]] == pytest.approx(3.0)
    assert field[0, 0, 0] == pytest.approx(-3.0)
    assert float(field.max()) <= 3.0 + 1e-5 and float(field.min()) >= -3.0 - 1e-5


def test_smoothing_follows_the_gaussians_size_not_the_voxel_grid():
    """Blur of the fused field: none for dense thin discs, about the blob size for blobs, at
    least a part of a sparse disc's width, capped (tdgen.fusion.smoothing_voxels)."""
    from tdgen.fusion import SMOOTH_MAX_VOXELS, smoothing_voxels
    from tdgen.testing.splats import fibonacci_sphere, isotropic

    pts = fibonacci_sphere(2000, 0.5)
    voxel = 0.01
    dense = surfels(pts, pts / 0.5, spacing=0.004)  # discs under half a voxel
    sparse = surfels(pts, pts / 0.5, spacing=0.03)  # discs three voxels wide
    blobs = isotropic(pts, sigma=0.015, opacity=0.9)
    assert smoothing_voxels(dense, voxel) < 0.5
    assert 1.0 < smoothing_voxels(sparse, voxel) < SMOOTH_MAX_VOXELS
    assert 1.0 < smoothing_voxels(blobs, voxel) <= SMOOTH_MAX_VOXELS
    assert smoothing_voxels(isotropic(pts, sigma=0.2, opacity=0.9), voxel) == SMOOTH_MAX_VOXELS


def test_smoothing_keeps_a_plane_and_the_outside_layer():
    from tdgen.fusion import _smooth

    G = 24
    z = torch.arange(G, dtype=torch.float32)
    plane = (10.5 - z).clamp(-3, 3).expand(G, G, G).clone()  # distance to the plane z = 10.5, inside below
    out = _smooth(plane, 1.5)
    # A plane's zero level does not move (kernel and truncated distance are both symmetric about
    # it), the field is smoother there, and the border stays outside.
    torch.testing.assert_close(out[:, :, 10], -out[:, :, 11], atol=1e-5, rtol=0)
    assert (out[:, :, 10] > 0).all() and (out[:, :, 10] < plane[:, :, 10]).all()
    assert torch.allclose(out[:, :, -1], torch.tensor(-3.0), atol=1e-5)
    torch.testing.assert_close(out[0, 0, :], out[-1, -1, :])
    assert _smooth(plane, 0.05) is plane  # below a tenth of a voxel: untouched
