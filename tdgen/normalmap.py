"""Stage 2c′: a tangent-space normal map baked from the high-resolution surface onto the
decimated, unwrapped mesh (the usual high-poly → low-poly bake), and the tangents it is
expressed in.

For every texel of the low-poly's UV atlas: its surface point p and interpolated normal N; the
high-poly surface is found along the line p + t·N (the ray a cage bake casts, both ways, since the
decimated surface passes above and below the fine one), falling back to the nearest point of the
high-poly facing the same way where no nearby triangle is hit; the high-poly's smooth normal
there, expressed in the texel's (T, B, N) frame, is the texel's colour. glTF's convention: the
tangent frame of the `TANGENT` attribute, RGB = (xyz + 1) / 2, +Y (green) toward −v (the image's
up, "OpenGL" normal maps), so an unchanged normal is (128, 128, 255).

Why our own tangents: MikkTSpace is what Blender computes (it ignores a file's TANGENT) and
what glTF asks clients to compute when TANGENT is missing, but three.js does not (without
TANGENT it builds a frame from screen-space derivatives). No licence-clean MikkTSpace binding
installs here (pymikktspace has no wheel and its sdist does not build), so `vertex_tangents`
follows MikkTSpace's per-vertex rule itself — per-corner tangents projected onto the vertex
normal's plane, weighted by the corner's angle, split by UV orientation sign — and the exporter
writes them as TANGENT, which three.js and other clients then use as they are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tdgen.config import TextureConfig
from tdgen.errors import GenerationError
from tdgen.meshdata import Mesh
from tdgen.raster import bounding_sphere, interpolate_ids, rasterize_uv

CANDIDATES = 16
"""High-poly triangles (nearest centroids to the texel's point) tested per texel: enough that the
hit along the normal is among them where the decimated surface lies within a few fine triangles
of the high-poly (tests/test_normalmap.py's tilted plane needs ~4)."""
MAX_DISTANCE = 0.05
"""Farthest the high-poly may be from the low-poly along the normal, as a fraction of the
bounding radius; beyond it a texel keeps the low-poly's own normal (a flat texel)."""
TIE_NUDGE = 1e-4
"""Added to every encoded value (0.026 of an 8-bit step): see the end of `bake_normal_map`."""
CHUNK = 65_536
"""Texels per batch of the candidate tests (about 60 MB of temporaries at 16 candidates)."""


def vertex_tangents(mesh: Mesh) -> np.ndarray:  # → [V, 4] float32: unit xyz ⟂ normal, w = ±1
    """Per-vertex tangents in MikkTSpace's sense for `mesh` (with uvs, glTF v down).

    T points along +u; the bitangent B = w · cross(N, T) along −v (the image's up; MikkTSpace as
    Blender and three.js run it sees v flipped, OpenGL style). A vertex without a usable
    corner (all its triangles degenerate in UV) gets any unit vector ⟂ N with w = +1, so the
    attribute stays valid glTF.
    """
    if mesh.uvs is None:
        raise ValueError("vertex_tangents needs a mesh with uvs")
    v = mesh.vertices.astype(np.float64)
    uv = mesh.uvs.astype(np.float64) * np.array([1.0, -1.0])  # v up, as MikkTSpace sees it
    f = mesh.faces.astype(np.int64)
    n = mesh.normals.astype(np.float64)
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    # the exporter's rule for a zero normal (+Y), so T stays ⟂ the NORMAL that is written
    n = np.where(ln > 1e-12, n / np.maximum(ln, 1e-12), np.array([0.0, 1.0, 0.0]))
    V = len(v)

    p0, p1, p2 = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    t0, t1, t2 = uv[f[:, 0]], uv[f[:, 1]], uv[f[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = t1 - t0, t2 - t0
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]  # [F] signed UV area ×2: the orientation
    ok = np.abs(det) > 1e-20
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    sdir = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv  # [F, 3] ∂p/∂u
    # MikkTSpace keeps the tangent's direction only; the orientation goes in w.
    sign = np.where(det >= 0, 1.0, -1.0)  # [F]

    acc = np.zeros((2, V, 3))  # per vertex, one sum per orientation (MikkTSpace splits them)
    count = np.zeros((2, V))
    for c in range(3):
        i = f[:, c]
        a, b = v[f[:, (c + 1) % 3]] - v[i], v[f[:, (c + 2) % 3]] - v[i]
        ni = n[i]
        # The corner's edges and the face tangent projected onto the vertex normal's plane.
        a = a - ni * (a * ni).sum(1, keepdims=True)
        b = b - ni * (b * ni).sum(1, keepdims=True)
        t = sdir - ni * (sdir * ni).sum(1, keepdims=True)
        la, lb, lt = (np.linalg.norm(x, axis=1) for x in (a, b, t))
        good = ok & (la > 1e-20) & (lb > 1e-20) & (lt > 1e-20)
        cos = np.clip((a * b).sum(1) / np.maximum(la * lb, 1e-40), -1.0, 1.0)
        w = np.where(good, np.arccos(cos), 0.0)  # the corner's angle (MikkTSpace's weight)
        t = t / np.maximum(lt, 1e-40)[:, None] * w[:, None]
        o = (sign < 0).astype(np.int64)
        np.add.at(acc, (o, i), t)
        np.add.at(count, (o, i), w)
    # One tangent per vertex: the orientation with the larger angle sum (xatlas charts do not
    # mirror, so a vertex of two orientations is a degenerate sliver's corner at most).
    o = (count[1] > count[0]).astype(np.int64)
    T = acc[o, np.arange(V)]  # [V, 3]
    w = np.where(o == 1, -1.0, 1.0)
    T = T - n * (T * n).sum(1, keepdims=True)
    length = np.linalg.norm(T, axis=1)
    # Fallback for vertices without a usable corner: the axis least aligned with N, made ⟂ N.
    axis = np.eye(3)[np.argmin(np.abs(n), axis=1)]
    fallback = axis - n * (axis * n).sum(1, keepdims=True)
    fallback /= np.maximum(np.linalg.norm(fallback, axis=1, keepdims=True), 1e-12)
    bad = length < 1e-12
    T = np.where(bad[:, None], fallback, T / np.maximum(length, 1e-12)[:, None])
    w = np.where(bad, 1.0, w)
    return np.concatenate([T, w[:, None]], axis=1).astype(np.float32)


def _closest_on_triangles(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentrics [..., 3] of the point of triangle (a, b, c) nearest to p, all [..., 3]
    (Ericson, Real-Time Collision Detection §5.1.5, branch-free)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-30
    denom = (va + vb + vc)
    v_in = vb / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    w_in = vc / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    out = torch.stack([1 - v_in - w_in, v_in, w_in], -1)

    def put(cond, u, v, w):
        nonlocal out
        out = torch.where(cond[..., None], torch.stack([u, v, w], -1), out)

    zero, one = torch.zeros_like(d1), torch.ones_like(d1)
    # Edges first, then vertices (a vertex region lies inside the conditions of its edges).
    t_bc = (d4 - d3) / torch.clamp_min((d4 - d3) + (d5 - d6), eps)
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), zero, 1 - t_bc, t_bc)
    t_ac = d2 / torch.clamp_min(d2 - d6, eps)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), 1 - t_ac, zero, t_ac)
    t_ab = d1 / torch.clamp_min(d1 - d3, eps)
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), 1 - t_ab, t_ab, zero)
    put((d6 >= 0) & (d5 <= d6), zero, zero, one)
    put((d3 >= 0) & (d4 <= d3), zero, one, zero)
    put((d1 <= 0) & (d2 <= 0), one, zero, zero)
    return out


def _ray_hits(p: Tensor, d: Tensor, a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Line p + t·d against triangles (a, b, c), all [..., 3] (Möller–Trumbore): signed t [...]
    (inf where missed) and the hit's barycentrics [..., 3]."""
    e1, e2 = b - a, c - a
    h = torch.linalg.cross(d, e2)
    det = (e1 * h).sum(-1)
    okd = det.abs() > 1e-12
    inv = 1.0 / torch.where(okd, det, torch.ones_like(det))
    s = p - a
    u = (s * h).sum(-1) * inv
    q = torch.linalg.cross(s, e1)
    v = (d * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    tol = 1e-6  # a ray through a shared edge hits at least one of its two triangles
    hit = okd & (u >= -tol) & (v >= -tol) & (u + v <= 1 + tol)
    return torch.where(hit, t, torch.full_like(t, float("inf"))), torch.stack([1 - u - v, u, v], -1)


@torch.no_grad()
def bake_normal_map(
    high: Mesh,  # the fine surface (marching cubes, cleaned, before decimation); uvs unused
    low: Mesh,  # the decimated mesh with uvs
    cfg: TextureConfig,
    size: int | None = None,
) -> Tensor:
    """`high`'s normals on `low`'s UV layout in `low`'s tangent frame (`vertex_tangents`):
    texture [S, S, 3] float32 in [0, 1] (S = `size` or `cfg.size`, row 0 = top), gutters filled
    from the nearest chart texel like the base colour's."""
    from scipy.spatial import cKDTree

    from tdgen.texture import fill_gutters

    if low.uvs is None:
        raise GenerationError("the mesh has no UVs; run unwrap_mesh before bake_normal_map")
    S = int(size or cfg.size)
    faces = torch.as_tensor(low.faces).long()
    fid, bary = rasterize_uv(torch.as_tensor(low.uvs).float(), faces, S)
    idx = torch.nonzero(fid.reshape(-1) >= 0).squeeze(1)  # [T] covered texels, flat into S²
    if len(idx) == 0:
        raise GenerationError("the mesh's UV layout covers no texel; raise texture.size")
    fid_t, bary_t = fid.reshape(-1)[idx], bary.reshape(-1, 3)[idx]

    # 1. each texel's point and (T, B, N) frame, interpolated as a shader does
    tangents = torch.as_tensor(vertex_tangents(low))  # [V, 4]
    lv = torch.as_tensor(low.vertices).float()
    points = interpolate_ids(lv, faces, fid_t, bary_t)  # [T, 3]
    N = F.normalize(interpolate_ids(torch.as_tensor(low.normals).float(), faces, fid_t, bary_t), dim=-1)
    Tg = interpolate_ids(tangents, faces, fid_t, bary_t)  # [T, 4]
    T = F.normalize(Tg[:, :3], dim=-1)
    # glTF (and three.js, per vertex): B = w · cross(N, T); a seam-free chart has one w per face.
    B = F.normalize(torch.linalg.cross(N, T), dim=-1) * torch.where(Tg[:, 3:4] < 0, -1.0, 1.0)

    # 2. the high-poly surface along each texel's normal (nearest facing point where none is hit)
    hv = torch.as_tensor(high.vertices).float()
    hf = torch.as_tensor(high.faces).long()
    hn = torch.as_tensor(high.normals).float()
    tri = hv[hf]  # [H, 3, 3]
    fn = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    _, radius = bounding_sphere(high.vertices)
    reach = MAX_DISTANCE * radius
    k = min(CANDIDATES, len(hf))
    _, cand = cKDTree(tri.mean(1).numpy()).query(points.numpy(), k=k, workers=-1)
    cand = torch.as_tensor(cand.reshape(len(idx), k)).long()  # [T, k]
    normal = N.clone()
    for s in range(0, len(idx), CHUNK):
        sl = slice(s, s + CHUNK)
        cid = cand[sl]  # [t, k]
        a, b, c = tri[cid, 0], tri[cid, 1], tri[cid, 2]  # [t, k, 3]
        p = points[sl, None].expand_as(a)
        n = N[sl, None].expand_as(a)
        facing = (fn[cid] * n).sum(-1) > 0.0  # [t, k]: a thin part's far side never lends its normal
        t_hit, b_hit = _ray_hits(p, n, a, b, c)
        b_near = _closest_on_triangles(p, a, b, c)
        near = (b_near[..., :1] * a + b_near[..., 1:2] * b + b_near[..., 2:] * c - p).norm(dim=-1)
        hit_ok = facing & (t_hit.abs() <= reach)
        near_ok = facing & (near <= reach)
        # A hit along the normal always wins over a nearest point (score offset by 2·reach).
        score = torch.where(hit_ok, t_hit.abs(), torch.where(near_ok, 2 * reach + near,
                                                             torch.full_like(near, float("inf"))))
        best = score.argmin(1)  # [t]
        found = torch.isfinite(score.gather(1, best[:, None]))[:, 0]
        pick = lambda x: x[torch.arange(len(best)), best]  # noqa: E731  [t, k, ...] → [t, ...]
        use_hit = pick(hit_ok)
        bc = torch.where(use_hit[:, None], pick(b_hit), pick(b_near)).clamp_min(0.0)  # [t, 3]
        fsel = pick(cid)
        hn_t = (hn[hf[fsel]] * bc[..., None]).sum(1)  # [t, 3] the fine surface's smooth normal
        hn_t = torch.where(hn_t.norm(dim=-1, keepdim=True) > 1e-6, F.normalize(hn_t, dim=-1), fn[fsel])
        normal[sl] = torch.where(found[:, None], hn_t, N[sl])

    # 3. into the texel's frame: the m with T·mx + B·my + N·mz ∥ the high normal (what a shader
    # reconstructs), z kept in front (a normal map cannot point into the surface)
    frame = torch.stack([T, B, N], -1)  # [T, 3, 3] columns T, B, N
    m = torch.linalg.solve(frame, normal[..., None])[..., 0]
    m = torch.where(torch.isfinite(m).all(-1, keepdim=True), m, torch.tensor([0.0, 0.0, 1.0]))
    m[:, 2] = m[:, 2].clamp_min(1e-3)
    m = F.normalize(m, dim=-1)

    texture = torch.zeros(S * S, 3)
    texture[:] = torch.tensor([0.5 + TIE_NUDGE, 0.5 + TIE_NUDGE, 1.0])
    # A zero component encodes to 127.5 exactly; the nudge rounds it to 128 (the flat
    # (128, 128, 255) every tool expects) rather than to whichever way float noise tips it.
    texture[idx] = m * 0.5 + (0.5 + TIE_NUDGE)
    mask = torch.zeros(S * S, dtype=torch.bool)
    mask[idx] = True
    return fill_gutters(texture.view(S, S, 3), mask.view(S, S))
