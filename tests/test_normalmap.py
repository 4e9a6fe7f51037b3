"""The high-poly → low-poly normal map: known answers in the tangent frame, and the tangents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from tdgen.config import TextureConfig
from tdgen.mesh import decimate, vertex_normals
from tdgen.meshdata import Mesh
from tdgen.normalmap import bake_normal_map, vertex_tangents
from tdgen.unwrap import unwrap_mesh

S = 64


def _plane(n: int, mirror: bool = False) -> Mesh:
    """A square [-.5, .5]² in z = 0 facing +Z, n×n quads; glTF uvs u = x + .5 (or .5 − x when
    `mirror`), v = .5 − y (the image's top row at +Y)."""
    x, y = np.meshgrid(np.linspace(-0.5, 0.5, n + 1), np.linspace(-0.5, 0.5, n + 1))
    v = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], 1).astype(np.float32)
    i = np.arange((n + 1) * (n + 1)).reshape(n + 1, n + 1)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, 1:].ravel(), i[1:, :-1].ravel()
    f = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.int64)
    u = 0.5 - v[:, 0] if mirror else v[:, 0] + 0.5
    uv = np.stack([u, 0.5 - v[:, 1]], 1).astype(np.float32)
    return Mesh(v, f, np.tile(np.float32([0, 0, 1]), (len(v), 1)), uv)


def _texels(nm) -> np.ndarray:  # [S, S, 3] float → uint8 as the exporter writes it
    return np.round(np.clip(nm.numpy(), 0, 1) * 255).astype(np.int64)


def test_tangents_of_a_plane_follow_u_and_the_image_up():
    t = vertex_tangents(_plane(4))
    assert np.allclose(t, [1, 0, 0, 1], atol=1e-6)  # T = +X, B = cross(N, T)·w = +Y = image up
    t = vertex_tangents(_plane(4, mirror=True))
    assert np.allclose(t, [-1, 0, 0, -1], atol=1e-6)  # u runs −X: T flips, w keeps B at +Y


def test_tangents_are_unit_perpendicular_and_signed_on_an_unwrapped_sphere():
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v, f = s.vertices.astype(np.float32), s.faces.astype(np.int64)
    m = unwrap_mesh(Mesh(v, f, vertex_normals(v, f)), TextureConfig(size=256))
    t = vertex_tangents(m)
    assert np.allclose(np.linalg.norm(t[:, :3], axis=1), 1, atol=1e-5)
    assert np.abs((t[:, :3] * m.normals).sum(1)).max() < 1e-4
    assert set(np.unique(t[:, 3])) <= {-1.0, 1.0}
    # T follows +u: along every edge, the change in u and the tangent agree in sign (mostly;
    # curvature bends a few)
    e = m.vertices[m.faces[:, 1]] - m.vertices[m.faces[:, 0]]
    du = m.uvs[m.faces[:, 1], 0] - m.uvs[m.faces[:, 0], 0]
    big = np.abs(du) > 1e-3
    agree = np.sign((e * t[m.faces[:, 0], :3]).sum(1)) == np.sign(du)
    assert agree[big].mean() > 0.95


def test_identical_high_and_low_poly_bake_flat():
    """Where the high-poly is the low-poly, every texel is the unchanged normal (128, 128, 255),
    gutters included."""
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v, f = s.vertices.astype(np.float32), s.faces.astype(np.int64)
    low = unwrap_mesh(Mesh(v, f, vertex_normals(v, f)), TextureConfig(size=S))
    high = Mesh(v, f, vertex_normals(v, f))
    px = _texels(bake_normal_map(high, low, TextureConfig(size=S)))
    assert np.abs(px - [128, 128, 255]).max() <= 1
    assert (px == [128, 128, 255]).all(-1).mean() > 0.99


@pytest.mark.parametrize("mirror", [False, True])
def test_tilted_high_poly_normals_land_in_the_tangent_frame(mirror):
    """A flat low-poly over a finer plane whose normals lean 25° toward +X (and 10° toward +Y):
    red carries the lean along T (−X when the uvs are mirrored), green the lean along B (+Y,
    the image's up, in both cases)."""
    a, b = math.radians(25), math.radians(10)
    lean = np.array([math.sin(a), math.sin(b), 0.0])
    lean[2] = math.sqrt(1 - lean[0] ** 2 - lean[1] ** 2)
    high = _plane(16)
    high = Mesh(high.vertices, high.faces, np.tile(lean.astype(np.float32), (len(high.vertices), 1)))
    low = _plane(2, mirror)
    nm = bake_normal_map(high, low, TextureConfig(size=S)).numpy()
    m = nm[4:-4, 4:-4].reshape(-1, 3) * 2 - 1  # away from the border
    want = np.array([-lean[0] if mirror else lean[0], lean[1], lean[2]])
    assert np.abs(m - want).max() < 0.01, (m.mean(0), want)


def test_decimated_bumpy_ball_gets_its_bumps_back():
    """The usual bake: a bumpy ball decimated hard; the normals the map gives back (in the
    tangent frame, decoded as a shader does) are much closer to the high-poly's than the
    low-poly's own, and the map stays flat where there is nothing to add (none: all bumpy)."""
    import torch

    from tdgen.raster import interpolate_ids, rasterize_uv

    s = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    d = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
    v = (d * (0.5 + 0.02 * np.sin(9 * d[:, 0]) * np.sin(9 * d[:, 1]) * np.sin(9 * d[:, 2]))[:, None])
    v, f = v.astype(np.float32), s.faces.astype(np.int64)
    high = Mesh(v, f, vertex_normals(v, f))
    lv, lf = decimate(v, f, 600)
    low = unwrap_mesh(Mesh(lv, lf, vertex_normals(lv, lf)), TextureConfig(size=128))
    nm = bake_normal_map(high, low, TextureConfig(size=128))

    faces = torch.as_tensor(low.faces)
    fid, bary = rasterize_uv(torch.as_tensor(low.uvs), faces, 128)
    idx = torch.nonzero(fid.reshape(-1) >= 0).squeeze(1)
    fid_t, bary_t = fid.reshape(-1)[idx], bary.reshape(-1, 3)[idx]
    interp = lambda a: interpolate_ids(torch.as_tensor(a).float(), faces, fid_t, bary_t)  # noqa: E731
    p = interp(low.vertices)
    N = torch.nn.functional.normalize(interp(low.normals), dim=-1)
    tg = interp(vertex_tangents(low))
    T = torch.nn.functional.normalize(tg[:, :3], dim=-1)
    B = torch.nn.functional.normalize(torch.linalg.cross(N, T), dim=-1) * torch.sign(tg[:, 3:])
    m = nm.reshape(-1, 3)[idx] * 2 - 1
    shaded = torch.nn.functional.normalize(m[:, :1] * T + m[:, 1:2] * B + m[:, 2:] * N, dim=-1)
    # the high-poly's true normal at the nearest high vertex of each texel point
    from scipy.spatial import cKDTree

    _, near = cKDTree(high.vertices).query(p.numpy())
    truth = torch.as_tensor(high.normals[near])
    err_low = torch.rad2deg(torch.arccos((N * truth).sum(-1).clamp(-1, 1))).mean()
    err_map = torch.rad2deg(torch.arccos((shaded * truth).sum(-1).clamp(-1, 1))).mean()
    assert err_map < 0.4 * err_low, (float(err_map), float(err_low))
