"""The triangle rasterizer against brute-force ray casts, the fill rule, UV coverage, lookups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdgen.meshdata import Mesh
from tdgen.raster import (
    framing_cameras,
    interpolate,
    rasterize,
    rasterize_uv,
    render_mesh,
    sample_texture,
)


def make_cams(viewmats, f, size):
    from tdgen.render import Cameras

    viewmats = torch.as_tensor(np.asarray(viewmats), dtype=torch.float32).reshape(-1, 4, 4)
    C = viewmats.shape[0]
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]]).expand(C, 3, 3)
    zeros = torch.zeros(C)
    return Cameras(viewmats=viewmats, Ks=K.clone(), width=size, height=size,
                   elevation=zeros, azimuth=zeros)


def ray_cast(verts, faces, cams):
    """Nearest hit per pixel centre by Möller–Trumbore in float64: (face [C,H,W], depth, 2nd depth)."""
    V = verts.astype(np.float64)
    tri = V[faces]  # [F, 3, 3]
    out_f, out_d, out_d2 = [], [], []
    H, W = cams.height, cams.width
    for vm, K in zip(cams.viewmats.double().numpy(), cams.Ks.double().numpy()):
        R, t = vm[:3, :3], vm[:3, 3]
        origin = -R.T @ t
        jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        dcam = np.stack([(ii - K[0, 2]) / K[0, 0], (jj - K[1, 2]) / K[1, 1], np.ones_like(ii)], -1)
        dirs = dcam.reshape(-1, 3) @ R  # camera z = 1 along each ray, so t is camera depth
        e1 = tri[:, 1] - tri[:, 0]
        e2 = tri[:, 2] - tri[:, 0]
        p = np.cross(dirs[:, None, :], e2[None])  # [P, F, 3]
        det = (p * e1[None]).sum(-1)
        inv = 1.0 / np.where(np.abs(det) < 1e-12, np.nan, det)
        s = origin[None, None] - tri[None, :, 0]
        u = (s * p).sum(-1) * inv
        q = np.cross(s, e1[None])
        v = (dirs[:, None, :] * q).sum(-1) * inv
        tt = (e2[None] * q).sum(-1) * inv
        hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (tt > 0)
        tt = np.where(hit, tt, np.inf)
        order = np.argsort(tt, axis=1)
        first = order[:, 0]
        d1 = np.take_along_axis(tt, order[:, :1], 1)[:, 0]
        d2 = np.take_along_axis(tt, order[:, 1:2], 1)[:, 0]
        margin = np.minimum(np.minimum(u, v), 1 - u - v)
        m1 = np.take_along_axis(margin, order[:, :1], 1)[:, 0]
        out_f.append(np.where(np.isfinite(d1), first, -1).reshape(H, W))
        out_d.append(d1.reshape(H, W))
        gap = np.where(np.isfinite(d2), d2 - np.where(np.isfinite(d1), d1, 0.0), np.inf)
        out_d2.append(np.where(np.isfinite(d1), np.minimum(gap, m1), np.inf).reshape(H, W))
    return np.stack(out_f), np.stack(out_d), np.stack(out_d2)


def random_soup(seed=0, n=40):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-0.6, 0.6, (n, 1, 3))
    verts = (centres + rng.normal(0, 0.25, (n, 3, 3))).reshape(-1, 3).astype(np.float32)
    faces = np.arange(3 * n).reshape(n, 3)
    return verts, faces


def test_matches_brute_force_ray_cast():
    verts, faces = random_soup()
    cams = framing_cameras(verts, [0.0, 35.0, -60.0], [0.0, 100.0, 220.0], 40)
    r = rasterize(torch.from_numpy(verts), torch.from_numpy(faces), cams)
    ref_f, ref_d, ambiguity = ray_cast(verts, faces, cams)
    clear = ambiguity > 1e-4  # not on an edge or at a depth tie; empty pixels count as clear
    got_f = r.face_id.numpy()
    assert (ref_f >= 0).sum() > 500  # the test scene covers a good part of the images
    assert np.array_equal(got_f[clear], ref_f[clear])
    hit = clear & (ref_f >= 0)
    assert np.allclose(r.depth.numpy()[hit], ref_d[hit], rtol=1e-4, atol=1e-5)
    assert np.isinf(r.depth.numpy()[got_f < 0]).all()
    assert (r.bary.numpy()[got_f < 0] == 0).all()
    # Ambiguous pixels may go either way, but there are few of them.
    assert (got_f != ref_f).mean() < 0.01


def test_perspective_correct_barycentrics_reproduce_positions():
    verts, faces = random_soup(seed=3, n=25)
    cams = framing_cameras(verts, [20.0, -10.0], [30.0, 250.0], 32, fovy=60.0)
    r = rasterize(torch.from_numpy(verts), torch.from_numpy(faces), cams)
    pos = interpolate(torch.from_numpy(verts), torch.from_numpy(faces), r)  # [C, H, W, 3]
    # The world point at the rasterised depth along each pixel's ray.
    for c in range(2):
        R = cams.viewmats[c, :3, :3].double()
        t = cams.viewmats[c, :3, 3].double()
        K = cams.Ks[c].double()
        jj, ii = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
        d = torch.stack([(ii - K[0, 2]) / K[0, 0], (jj - K[1, 2]) / K[1, 1], torch.ones_like(ii)], -1)
        ray = (d.double() * r.depth[c, ..., None].double() - t) @ R  # R^T (z·d − t)
        m = r.face_id[c] >= 0
        assert m.sum() > 100
        assert torch.allclose(pos[c][m].double(), ray[m], atol=2e-4)
        assert torch.allclose(r.bary[c][m].sum(-1), torch.ones(int(m.sum())), atol=1e-5)
        assert (r.bary[c][m] >= -1e-6).all()


def test_pixel_aligned_quad_has_no_double_coverage_or_cracks():
    # A square at z = 2 whose corners project to pixel centres, split along the diagonal, plus a
    # fan around a centre vertex: many pixel centres lie exactly on shared edges and vertices.
    s = 1.875
    verts = np.array([[-s, -s, 2], [s, -s, 2], [s, s, 2], [-s, s, 2], [0, 0, 2]], np.float32)
    quad = np.array([[0, 1, 2], [0, 2, 3]])
    fan = np.array([[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    cams = make_cams(np.eye(4), 8.0, 16)  # x_pix = 4X + 8: corners at 0.5 and 15.5
    for faces in (quad, fan, quad[:, ::-1].copy()):
        total = np.zeros((16, 16), int)
        for f in faces:
            total += rasterize(torch.from_numpy(verts), torch.from_numpy(f[None]), cams).face_id[0].numpy() >= 0
        union = rasterize(torch.from_numpy(verts), torch.from_numpy(faces), cams).face_id[0].numpy()
        assert total.max() == 1  # no pixel belongs to two triangles
        inner = np.zeros((16, 16), bool)
        inner[1:15, 1:15] = True  # strictly inside the square: must all be covered
        assert (total[inner] == 1).all()
        assert np.array_equal(total == 1, union >= 0)


def test_uv_quad_diagonal_covered_exactly_once():
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    fid, bary = rasterize_uv(uv, faces, 8)
    assert (fid >= 0).all()  # every texel of the unit square
    a, _ = rasterize_uv(uv, faces[:1], 8)
    b, _ = rasterize_uv(uv, faces[1:], 8)
    assert ((a >= 0).int() + (b >= 0).int() == 1).all()
    # Texel centres on the diagonal (r == c) go to one side only.
    assert len(set(fid.diagonal().tolist())) == 1
    # Interpolated uv at a texel is its centre (v = 0 is the top row).
    uvi = (bary[..., :, None] * uv[faces[fid]]).sum(-2)
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    centre = torch.stack([(c + 0.5) / 8, (r + 0.5) / 8], -1)
    assert torch.allclose(uvi, centre, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uv_raster_covers_every_texel_inside_a_triangle(seed):
    rng = np.random.default_rng(seed)
    S = 64
    tri = rng.uniform(0.0, 1.0, (3, 2)).astype(np.float32)
    fid, bary = rasterize_uv(torch.from_numpy(tri), torch.tensor([[0, 1, 2]]), S)
    r, c = np.mgrid[0:S, 0:S]
    p = np.stack([(c + 0.5) / S, (r + 0.5) / S], -1).astype(np.float64)
    a, b, cc = tri.astype(np.float64)

    def edge(p0, p1):
        return (p1[0] - p0[0]) * (p[..., 1] - p0[1]) - (p1[1] - p0[1]) * (p[..., 0] - p0[0])

    e = np.stack([edge(a, b), edge(b, cc), edge(cc, a)], -1)
    e *= np.sign((b - a)[0] * (cc - a)[1] - (b - a)[1] * (cc - a)[0])  # inside is positive
    inside = (e > 1e-7).all(-1)
    outside = (e < -1e-7).any(-1)
    got = fid.numpy() >= 0
    assert got[inside].all()
    assert not got[outside].any()
    assert abs(got.sum() - inside.sum()) <= 2 * S  # only texels on the edges can differ


def test_culling_near_plane_and_backfaces():
    # One CCW-from-outside triangle facing +Z, seen from the front (+Z) and from behind.
    verts = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    faces = torch.tensor([[0, 1, 2]])
    cams = framing_cameras(verts.numpy(), [0.0, 0.0], [0.0, 180.0], 16)
    both = rasterize(verts, faces, cams)
    assert (both.face_id[0] >= 0).any() and (both.face_id[1] >= 0).any()
    culled = rasterize(verts, faces, cams, cull_backfaces=True)
    assert (culled.face_id[0] >= 0).any()  # front face kept
    assert not (culled.face_id[1] >= 0).any()  # back face dropped
    behind = make_cams(np.diag([1.0, 1.0, -1.0, 1.0]) @ np.eye(4), 8.0, 16)  # object behind camera
    v = verts + torch.tensor([0.0, 0.0, 2.0])
    assert not (rasterize(v, faces, behind).face_id >= 0).any()


def test_sample_texture_reads_texels_with_v0_at_top_and_passes_gradients():
    S = 4
    tex = torch.rand(S, S, 3, requires_grad=True)
    r, c = 0, 2
    uv = torch.tensor([[(c + 0.5) / S, (r + 0.5) / S]])
    out = sample_texture(tex, uv)
    assert torch.allclose(out[0], tex[r, c], atol=1e-6)
    out2 = sample_texture(tex, torch.tensor([[[0.4 / S, 3.5 / S]]]))  # clamps at the left border
    assert out2.shape == (1, 1, 3)
    assert torch.allclose(out2[0, 0], tex[3, 0], atol=1e-6)
    out.sum().backward()
    g = tex.grad.abs().sum(-1)
    assert g[r, c] > 0 and g.sum() == g[r, c]


def test_interpolate_is_differentiable_and_zero_outside():
    verts = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    faces = torch.tensor([[0, 1, 2]])
    cams = framing_cameras(verts.numpy(), [0.0], [0.0], 16)
    r = rasterize(verts, faces, cams)
    attr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    out = interpolate(attr, faces, r)
    assert out.shape == (1, 16, 16, 2)
    assert (out[r.face_id < 0] == 0).all()
    out[..., 0].sum().backward()
    assert attr.grad[0, 0] > 0 and attr.grad[:, 1].abs().sum() == 0


def test_render_mesh_colours_and_background():
    # A front-facing quad whose left half of the texture is red and right half green.
    verts = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], np.float32)
    uvs = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32)  # +Y up is v = 0 (top row)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int64)
    mesh = Mesh(verts, faces, np.tile([[0, 0, 1]], (4, 1)).astype(np.float32), uvs)
    tex = torch.zeros(8, 8, 3)
    tex[:, :4, 0] = 1.0
    tex[:, 4:, 1] = 1.0
    tex[0, :, 2] = 1.0  # top row marked blue
    cams = framing_cameras(verts, [0.0], [0.0], 32, margin=1.0)
    tex.requires_grad_(True)
    rgb, alpha = render_mesh(mesh, tex, cams, torch.tensor([[0.2, 0.3, 0.4]]))
    assert rgb.shape == (1, 32, 32, 3) and alpha.shape == (1, 32, 32, 1)
    a = alpha[0, ..., 0]
    assert a[16, 16] == 1 and a[0, 0] == 0
    assert torch.allclose(rgb[0, 0, 0], torch.tensor([0.2, 0.3, 0.4]))
    assert rgb[0, 16, 10, 0] > 0.9 and rgb[0, 16, 22, 1] > 0.9  # left red, right green
    top = torch.nonzero(a.sum(1) > 0)[0, 0]
    assert rgb[0, top + 1, 16, 2] > 0.5  # the texture's top row appears at the top
    rgb.sum().backward()
    assert tex.grad.abs().sum() > 0


def test_framing_cameras_follow_orbit_convention_and_poles():
    verts = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32) + np.array([[0.3, 0, 0], [-0.3, 0, 0]])
    cams = framing_cameras(verts, [0.0, 0.0, 90.0, -90.0], [0.0, 90.0, 0.0, 0.0], 16)
    R = cams.viewmats[:, :3, :3]
    t = cams.viewmats[:, :3, 3]
    eye = -(R.transpose(1, 2) @ t[..., None])[..., 0]
    centre = torch.tensor([1.0, 2.0, 3.0])
    dirs = torch.nn.functional.normalize(eye - centre, dim=-1)
    expected = torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    assert torch.allclose(dirs, expected, atol=1e-5)
    assert torch.allclose(R[0, 1], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6)  # image y down = −Y
    assert torch.isfinite(cams.viewmats).all()
    # The centre projects to the image centre in every view.
    pc = (R @ centre + t)
    assert torch.allclose(pc[:, :2], torch.zeros(4, 2), atol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    verts, faces = random_soup(seed=5)
    cams = framing_cameras(verts, [10.0, -20.0], [0.0, 130.0], 64)
    cpu = rasterize(torch.from_numpy(verts), torch.from_numpy(faces), cams)
    cuda_cams = framing_cameras(verts, [10.0, -20.0], [0.0, 130.0], 64, device="cuda")
    gpu = rasterize(torch.from_numpy(verts).cuda(), torch.from_numpy(faces).cuda(), cuda_cams)
    same = (gpu.face_id.cpu() == cpu.face_id).float().mean()
    assert same > 0.995
