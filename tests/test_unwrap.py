"""xatlas unwrapping: seams split, positions kept, charts packed without overlap."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from tdgen.config import TextureConfig
from tdgen.errors import GenerationError
from tdgen.mesh import vertex_normals
from tdgen.meshdata import Mesh
from tdgen.unwrap import unwrap_mesh


def bumpy_sphere(subdivisions: int = 3) -> Mesh:
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
    v = np.asarray(s.vertices)
    v = v * (1.0 + 0.15 * np.sin(5 * v[:, :1]) * np.cos(4 * v[:, 1:2]))  # charts need some shape
    f = np.asarray(s.faces, dtype=np.int64)
    v = v.astype(np.float32)
    return Mesh(vertices=v, faces=f, normals=vertex_normals(v, f))


def uv_coverage(uvs: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """How many UV triangles cover each texel centre, [size, size] (row r ↔ v = (r + 0.5)/size)."""
    count = np.zeros((size, size), dtype=np.int32)
    tri = uvs[faces].astype(np.float64) * size - 0.5  # texel-centre units, (col, row)
    for a, b, c in tri:
        lo = np.clip(np.floor(np.min([a, b, c], axis=0)).astype(int), 0, size - 1)
        hi = np.clip(np.ceil(np.max([a, b, c], axis=0)).astype(int), 0, size - 1)
        cols, rows = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        e = [
            (q[0] - p[0]) * (rows - p[1]) - (q[1] - p[1]) * (cols - p[0])
            for p, q in ((a, b), (b, c), (c, a))
        ]
        inside = ((e[0] > 0) & (e[1] > 0) & (e[2] > 0)) | ((e[0] < 0) & (e[1] < 0) & (e[2] < 0))
        count[rows[inside], cols[inside]] += 1
    return count


@pytest.fixture(scope="module")
def unwrapped():
    m = bumpy_sphere()
    return m, unwrap_mesh(m, TextureConfig(size=256, padding=2))


def test_uvs_in_unit_square_and_seams_split(unwrapped):
    m, u = unwrapped
    assert u.uvs is not None and u.uvs.shape == (u.num_vertices, 2) and u.uvs.dtype == np.float32
    assert u.uvs.min() >= 0.0 and u.uvs.max() <= 1.0
    assert u.num_vertices > m.num_vertices  # a closed surface needs at least one seam
    assert u.num_faces == m.num_faces
    assert u.vertices.dtype == np.float32 and u.faces.dtype == np.int64


def test_positions_normals_and_winding_preserved(unwrapped):
    m, u = unwrapped
    # Face i of the output is face i of the input, corner for corner (vmapping carried the data).
    np.testing.assert_array_equal(u.vertices[u.faces], m.vertices[m.faces])
    np.testing.assert_array_equal(u.normals[u.faces], m.normals[m.faces])


def test_charts_do_not_overlap_and_fill_the_atlas(unwrapped):
    _, u = unwrapped
    cov = uv_coverage(u.uvs, u.faces, 256)
    covered = (cov > 0).sum()
    assert covered > 0.3 * 256 * 256  # xatlas filled a fair share of the texture
    assert (cov > 1).sum() < 0.005 * covered  # only edge texels may be counted twice
    # No UV triangle is degenerate or flipped inside its chart in bulk: areas are non-zero.
    a, b, c = (u.uvs[u.faces][:, i].astype(np.float64) for i in range(3))
    area = 0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    assert (np.abs(area) > 0).mean() > 0.99


def test_small_atlas_with_wide_padding_still_fits_one_page():
    # 4 texels of padding at 64² eat much of the page: xatlas's own estimate overflows it, and
    # unwrap_mesh must re-pack smaller rather than spill onto a second page.
    m = bumpy_sphere(2)
    u = unwrap_mesh(m, TextureConfig(size=64, padding=4))
    assert u.uvs.min() >= 0 and u.uvs.max() <= 1
    cov = uv_coverage(u.uvs, u.faces, 64)
    assert (cov > 1).sum() < 0.02 * (cov > 0).sum()


def test_empty_mesh_raises():
    z = np.zeros((0, 3), np.float32)
    empty = Mesh(z, np.zeros((0, 3), np.int64), z)
    with pytest.raises(GenerationError, match="mesh.threshold"):
        unwrap_mesh(empty, TextureConfig(size=64))


def test_many_small_charts_in_a_small_texture_still_pack():
    """A bumpy mesh whose charts cannot fit with a 4-texel gutter falls back to a narrower one."""
    import trimesh

    from tdgen.mesh import decimate, vertex_normals

    rng = np.random.default_rng(0)
    tm = trimesh.creation.icosphere(subdivisions=5)
    v = (tm.vertices * (1 + 0.15 * rng.standard_normal((len(tm.vertices), 1)))).astype(np.float32)
    v, f = decimate(v, tm.faces.astype(np.int64), 3000)
    out = unwrap_mesh(Mesh(v.astype(np.float32), f, vertex_normals(v, f)), TextureConfig(size=256))
    assert out.uvs.min() >= 0 and out.uvs.max() <= 1
    assert len(out.faces) == len(f)


def test_mesh_cut_into_parts_keeps_faces_positions_and_packs_without_overlap():
    from tdgen.unwrap import _split

    m = bumpy_sphere(3)  # 1280 faces
    parts = _split(m.vertices, m.normals, m.faces, 100)
    assert len(parts) == 13
    ids = np.concatenate([g for g, *_ in parts])
    assert np.array_equal(np.sort(ids), np.arange(m.num_faces))  # every face in exactly one part
    for g, used, local, pos, nrm in parts:  # local indices address the part's own vertices
        np.testing.assert_array_equal(used[local], m.faces[g])
        np.testing.assert_array_equal(pos[local], m.vertices[m.faces[g]])
        np.testing.assert_array_equal(nrm, m.normals[used])
    u = unwrap_mesh(m, TextureConfig(size=256, padding=2, unwrap_part_faces=100))
    one = unwrap_mesh(m, TextureConfig(size=256, padding=2, unwrap_part_faces=0))
    np.testing.assert_array_equal(u.vertices[u.faces], m.vertices[m.faces])
    np.testing.assert_array_equal(u.normals[u.faces], m.normals[m.faces])
    assert u.uvs.min() >= 0.0 and u.uvs.max() <= 1.0
    cov = uv_coverage(u.uvs, u.faces, 256)
    assert (cov > 1).sum() < 0.005 * (cov > 0).sum()  # parts share one atlas without overlap
    # the cuts become chart borders: more seam vertices than one piece, but not many more
    assert one.num_vertices < u.num_vertices < 1.5 * one.num_vertices
