"""Our own triangle rasterizer in plain PyTorch: face ids, perspective-correct barycentrics, depth.

Why not a library: nvdiffrast's licence is non-commercial, PyTorch3D does not install from PyPI
(and trimesh/pyrender only ray-cast or need OpenGL). Texturing needs just visibility and
interpolation, which a vectorised edge-function rasterizer gives on CPU and GPU alike:

1. project vertices (OpenCV pinhole) to pixel coordinates and camera z;
2. enumerate (triangle, pixel) candidates from each triangle's pixel bounding box, in chunks
   bounded by a memory budget (a huge triangle is split across chunks, never the whole image);
3. keep the pixel centres inside the triangle (top-left fill rule, so a pixel on an edge shared by
   two triangles belongs to exactly one of them);
4. z-buffer with one ``scatter_reduce(amin)`` on an int64 key ``depth_bits << 32 | triangle``:
   a positive float32's bit pattern orders like the float, so the key is an exact depth test with
   the lowest triangle id winning ties (deterministic);
5. perspective-correct barycentrics for the winners only.

There is no Python loop per triangle or per pixel; only over chunks. Triangles are not clipped:
one with a vertex behind the near plane is dropped (orbit cameras framing the object never need
clipping). The same core rasterises UV space for baking (orthographic, texel centres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tdgen.meshdata import Mesh

NEAR = 1e-5
"""Smallest camera z a vertex may have; triangles with a vertex nearer than this are dropped."""

MAX_PAIRS = 1 << 21
"""(triangle, pixel) candidates tested per chunk; about 150 bytes each of temporaries."""

_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Raster:
    face_id: Tensor
    """[C, H, W] long, the visible face per pixel, -1 where empty."""
    bary: Tensor
    """[C, H, W, 3] float32 perspective-correct barycentrics of the face's vertices (0 if empty)."""
    depth: Tensor
    """[C, H, W] float32 camera z (OpenCV, forward) of the visible surface, inf where empty."""


# ---------------------------------------------------------------------------------------------
# The core: screen-space triangles → per-pixel winners


def _edge_setup(xy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-triangle edge data for the inside test, oriented so that inside means `e >= 0`.

    xy: [T, 3, 2] pixel coordinates. Each edge i runs from vertex i to vertex i+1 and is
    evaluated from a canonical endpoint (the lexicographically smaller one): two triangles sharing
    an edge then compute bit-identical values of opposite sign, which the fill rule relies on.
    Returns packed [T, 12] = (canonical start x, y | signed direction dx, dy) per edge, the fill
    rule's tie-break [T, 3] and the doubled signed area [T].
    """
    a = xy
    b = xy.roll(-1, dims=1)  # [T, 3, 2] edge i: v_i → v_{i+1}
    swap = (a[..., 0] > b[..., 0]) | ((a[..., 0] == b[..., 0]) & (a[..., 1] > b[..., 1]))
    lo = torch.where(swap[..., None], b, a)
    d = torch.where(swap[..., None], a, b) - lo  # [T, 3, 2]
    flip = torch.where(swap, -1.0, 1.0).to(xy.dtype)
    # Doubled signed area = edge 0 evaluated at vertex 2, with the same canonical arithmetic.
    v2 = xy[:, 2]
    area = flip[:, 0] * (d[:, 0, 0] * (v2[:, 1] - lo[:, 0, 1]) - d[:, 0, 1] * (v2[:, 0] - lo[:, 0, 0]))
    # Multiplying by ±1 is exact, so folding the orientation into d keeps the symmetry.
    sd = d * (flip * torch.sign(area)[:, None])[..., None]
    # A pixel centre exactly on an edge is inside only for "top-left" edges (oriented direction
    # with dy > 0, or dy == 0 and dx < 0). The neighbour across a shared edge runs it the other
    # way, so exactly one of the two takes the pixel: no double coverage, no crack.
    tie = (sd[..., 1] > 0) | ((sd[..., 1] == 0) & (sd[..., 0] < 0))
    packed = torch.cat((lo.reshape(-1, 6), sd.reshape(-1, 6)), dim=1)
    return packed, tie, area


def _edge_values(packed: Tensor, t: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Oriented edge functions [P, 3] of pixel centres (px + .5, py + .5) against triangles t [P]."""
    pk = packed[t]  # [P, 12]
    lx, ly = pk[:, 0:6:2], pk[:, 1:6:2]
    dx, dy = pk[:, 6:12:2], pk[:, 7:12:2]
    cx = px.to(pk.dtype)[:, None] + 0.5
    cy = py.to(pk.dtype)[:, None] + 0.5
    return dx * (cy - ly) - dy * (cx - lx)


def _inside(e: Tensor, tie: Tensor, t: Tensor) -> Tensor:
    """[P] bool: inside under the fill rule (the tie-break is looked up only for edge hits)."""
    inside = (e > 0).all(dim=1)
    edge = (e >= 0).all(dim=1) & ~inside
    if bool(edge.any()):
        ids = torch.nonzero(edge).squeeze(1)
        ok = ((e[ids] > 0) | tie[t[ids]]).all(dim=1)
        inside[ids] = ok
    return inside


def _bary(e: Tensor, inv_z: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics [P, 3] and depth [P] from edge values and 1/z [P, 3]."""
    # Edge i is opposite vertex i+2, so vertex weights are (e1, e2, e0) / sum.
    b = e.roll(-1, dims=1)
    # 1/z is affine in screen space; attribute weights are b_i / z_i renormalised.
    w = b * inv_z
    s = w.sum(dim=1, keepdim=True)
    return w / s, b.sum(dim=1) / s[:, 0]


def _raster_core(
    xy: Tensor,  # [T, 3, 2] pixel coords, x right, y down, pixel (i, j) centred at (i+.5, j+.5)
    z: Tensor,  # [T, 3] positive depth per vertex (ones for orthographic)
    image: Tensor,  # [T] long, which image each triangle belongs to
    n_images: int,
    height: int,
    width: int,
    max_pairs: int = MAX_PAIRS,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rasterise triangles; returns covered pixels [P] (flat index into n_images·H·W), the winning
    triangle [P], its perspective-correct barycentrics [P, 3] and depth [P]."""
    device = xy.device
    xy = xy.float()
    z = z.float()
    packed, tie, area = _edge_setup(xy)
    inv_z = 1.0 / z

    # Pixel bounding box of each triangle: centres i + .5 within [min, max].
    big = float(max(width, height) + 2)
    mn = xy.amin(dim=1).clamp(-big, big)  # [T, 2]
    mx = xy.amax(dim=1).clamp(-big, big)
    i0 = torch.ceil(mn[:, 0] - 0.5).long().clamp_min(0)
    i1 = torch.floor(mx[:, 0] - 0.5).long().clamp_max(width - 1)
    j0 = torch.ceil(mn[:, 1] - 0.5).long().clamp_min(0)
    j1 = torch.floor(mx[:, 1] - 0.5).long().clamp_max(height - 1)
    nx = (i1 - i0 + 1).clamp_min(0)
    ny = (j1 - j0 + 1).clamp_min(0)
    counts = nx * ny
    counts = torch.where(area != 0, counts, torch.zeros_like(counts))  # degenerate → nothing
    cum = counts.cumsum(0)
    total = int(cum[-1]) if len(cum) else 0

    buf = torch.full((n_images * height * width,), _EMPTY, dtype=torch.int64, device=device)
    if total > 0:
        starts = cum - counts
        for start in range(0, total, max_pairs):
            ids = torch.arange(start, min(total, start + max_pairs), device=device)
            t = torch.searchsorted(cum, ids, right=True)
            local = ids - starts[t]
            nxt = nx[t]
            px = i0[t] + local % nxt
            py = j0[t] + torch.div(local, nxt, rounding_mode="floor")
            e = _edge_values(packed, t, px, py)  # [P, 3]
            keep = torch.nonzero(_inside(e, tie, t)).squeeze(1)
            if len(keep) == 0:
                continue
            t, px, py, e = t[keep], px[keep], py[keep], e[keep]
            # Perspective-correct depth: 1/z interpolates linearly in screen space.
            depth = e.sum(dim=1) / (e.roll(-1, dims=1) * inv_z[t]).sum(dim=1)
            depth = depth.clamp_min(0.0).contiguous()
            key = (depth.view(torch.int32).long() << 32) | t
            pix = (image[t] * height + py) * width + px
            buf.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)

    pix = torch.nonzero(buf != _EMPTY).squeeze(1)
    t = buf[pix] & 0xFFFFFFFF
    px = pix % width
    py = torch.div(pix, width, rounding_mode="floor") % height
    e = _edge_values(packed, t, px, py)
    bary, depth = _bary(e, inv_z[t])
    return pix, t, bary, depth


# ---------------------------------------------------------------------------------------------
# Public API


def project(vertices: Tensor, cams) -> tuple[Tensor, Tensor]:
    """Pixel coordinates [C, V, 2] and camera z [C, V] of world points [V, 3] (OpenCV pinhole)."""
    v = vertices.to(cams.viewmats.dtype)
    R = cams.viewmats[:, :3, :3]  # [C, 3, 3]
    t = cams.viewmats[:, :3, 3]  # [C, 3]
    pc = torch.einsum("cij,vj->cvi", R, v) + t[:, None, :]  # [C, V, 3]
    z = pc[..., 2]
    zs = torch.where(z > NEAR, z, torch.ones_like(z))  # avoid inf; such triangles are culled
    K = cams.Ks
    x = K[:, None, 0, 0] * pc[..., 0] / zs + K[:, None, 0, 2]
    y = K[:, None, 1, 1] * pc[..., 1] / zs + K[:, None, 1, 2]
    return torch.stack((x, y), dim=-1), z


def rasterize(
    vertices: Tensor,  # [V, 3] world
    faces: Tensor,  # [F, 3] long
    cams,  # render.Cameras: viewmats [C,4,4] OpenCV world→camera, Ks [C,3,3], width, height
    cull_backfaces: bool = False,
    max_pairs: int = MAX_PAIRS,
) -> Raster:
    """Rasterise a triangle mesh into every camera: the nearest face per pixel centre."""
    device = cams.viewmats.device
    vertices = torch.as_tensor(vertices, device=device).float()
    faces = torch.as_tensor(faces, device=device).long()
    C, H, W = int(cams.viewmats.shape[0]), int(cams.height), int(cams.width)
    nF = int(faces.shape[0])
    xy, z = project(vertices, cams)  # [C, V, 2], [C, V]
    fxy = xy[:, faces].float()  # [C, F, 3, 2]
    fz = z[:, faces].float()  # [C, F, 3]
    keep = (fz > NEAR).all(dim=-1)  # [C, F]
    if cull_backfaces:
        # Faces are CCW from outside; OpenCV's y-down image mirrors that to a negative area.
        e1 = fxy[:, :, 1] - fxy[:, :, 0]
        e2 = fxy[:, :, 2] - fxy[:, :, 0]
        keep &= (e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]) < 0
    idx = torch.nonzero(keep.reshape(-1)).squeeze(1)  # triangle ids into C·F
    face_id = torch.full((C * H * W,), -1, dtype=torch.long, device=device)
    bary = torch.zeros((C * H * W, 3), dtype=torch.float32, device=device)
    depth = torch.full((C * H * W,), math.inf, dtype=torch.float32, device=device)
    if len(idx):
        pix, t, b, dep = _raster_core(
            fxy.reshape(-1, 3, 2)[idx],
            fz.reshape(-1, 3)[idx],
            torch.div(idx, nF, rounding_mode="floor"),
            C, H, W, max_pairs,
        )
        face_id[pix] = idx[t] % nF
        bary[pix] = b
        depth[pix] = dep
    return Raster(face_id.view(C, H, W), bary.view(C, H, W, 3), depth.view(C, H, W))


def rasterize_uv(
    uvs: Tensor,  # [V, 2] glTF uv in [0, 1], v = 0 is the top row
    faces: Tensor,  # [F, 3] long
    size: int,
    max_pairs: int = MAX_PAIRS,
) -> tuple[Tensor, Tensor]:
    """Rasterise the UV layout at texel centres: face id [S, S] (-1 = gutter) and bary [S, S, 3].

    Texel (row r, col c) is covered by the face whose uv triangle contains ((c+.5)/S, (r+.5)/S);
    where charts overlap the lowest face id wins.
    """
    uvs = torch.as_tensor(uvs).float()
    faces = torch.as_tensor(faces, device=uvs.device).long()
    xy = (uvs * size)[faces]  # [F, 3, 2]: u → column, v → row (row 0 = top, no flip)
    ones = torch.ones(faces.shape, dtype=torch.float32, device=uvs.device)
    image = torch.zeros(len(faces), dtype=torch.long, device=uvs.device)
    pix, t, b, _ = _raster_core(xy, ones, image, 1, size, size, max_pairs)
    face_id = torch.full((size * size,), -1, dtype=torch.long, device=uvs.device)
    bary = torch.zeros((size * size, 3), dtype=torch.float32, device=uvs.device)
    face_id[pix] = t
    bary[pix] = b
    return face_id.view(size, size), bary.view(size, size, 3)


def interpolate(attr: Tensor, faces: Tensor, r: Raster) -> Tensor:
    """Barycentric interpolation of per-vertex attributes: [V, D] → [C, H, W, D] (0 where empty).

    Differentiable w.r.t. `attr` (the barycentrics themselves carry no gradient).
    """
    return interpolate_ids(attr, faces, r.face_id, r.bary)


def interpolate_ids(attr: Tensor, faces: Tensor, face_id: Tensor, bary: Tensor) -> Tensor:
    """`interpolate` for any face-id map [...] and barycentrics [..., 3]: returns [..., D]."""
    faces = torch.as_tensor(faces, device=attr.device).long()
    shape = face_id.shape
    fid = face_id.reshape(-1)
    covered = torch.nonzero(fid >= 0).squeeze(1)
    tri = faces[fid[covered]]  # [P, 3]
    vals = (attr[tri] * bary.reshape(-1, 3)[covered, :, None].to(attr.dtype)).sum(dim=1)  # [P, D]
    out = attr.new_zeros((fid.shape[0], attr.shape[-1]))
    out = out.index_put((covered,), vals)
    return out.view(*shape, attr.shape[-1])


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear texture lookup: texture [S, S, 3] (row 0 = top), uv [..., 2] glTF → [..., 3].

    Texel (r, c) is centred at uv ((c+.5)/S, (r+.5)/S), i.e. grid_sample with align_corners=False
    and x = 2u − 1, y = 2v − 1; outside [0, 1] clamps to the border. Differentiable w.r.t. texture.
    """
    shape = uv.shape[:-1]
    grid = (uv.reshape(1, -1, 1, 2).to(texture.dtype) * 2.0 - 1.0)
    img = texture.permute(2, 0, 1)[None]  # [1, 3, S, S]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0].transpose(0, 1).reshape(*shape, texture.shape[-1])


def render_mesh(
    mesh: Mesh,
    texture: Tensor,  # [S, S, 3] in [0, 1]
    cams,
    backgrounds: Tensor | tuple | float,  # [C, 3] or [3]
) -> tuple[Tensor, Tensor]:
    """Unlit textured render: rgb [C, H, W, 3] over the background and a hard alpha [C, H, W, 1].

    Differentiable w.r.t. `texture`; runs on the cameras' device.
    """
    if mesh.uvs is None:
        raise ValueError("render_mesh needs a mesh with uvs (run unwrap_mesh first)")
    device = cams.viewmats.device
    texture = texture.to(device)
    faces = torch.as_tensor(np.asarray(mesh.faces), device=device).long()
    verts = torch.as_tensor(np.asarray(mesh.vertices), device=device).float()
    uvs = torch.as_tensor(np.asarray(mesh.uvs), device=device).float()
    r = rasterize(verts, faces, cams)
    C, H, W = r.face_id.shape
    mask = r.face_id >= 0  # [C, H, W]
    uv = interpolate(uvs, faces, r)  # [C, H, W, 2]
    colour = sample_texture(texture, uv)  # [C, H, W, 3]
    bg = torch.as_tensor(backgrounds, dtype=texture.dtype, device=device)
    bg = bg.reshape(-1, 3).expand(C, 3)[:, None, None, :]
    rgb = torch.where(mask[..., None], colour, bg)
    return rgb, mask[..., None].to(texture.dtype)


# ---------------------------------------------------------------------------------------------
# Cameras that frame a mesh (texturing renders any input, so the object need not be at the origin
# nor of radius 0.5)


def bounding_sphere(vertices: np.ndarray | Tensor) -> tuple[np.ndarray, float]:
    """Centre (of the bounding box) [3] and radius enclosing every vertex [V, 3]."""
    v = np.asarray(torch.as_tensor(vertices).detach().cpu(), dtype=np.float64)
    centre = (v.min(axis=0) + v.max(axis=0)) / 2.0
    radius = float(np.linalg.norm(v - centre, axis=1).max()) if len(v) else 1.0
    return centre, max(radius, 1e-6)


def framing_cameras(
    vertices: np.ndarray | Tensor,  # [V, 3] the mesh to frame
    elevation,  # [C] degrees, orbit convention (el > 0 above, looking down)
    azimuth,  # [C] degrees (0 = front, camera on +Z; 90 = from +X)
    size: int,
    fovy: float = 49.1,
    margin: float = 1.1,
    device: torch.device | str | None = None,
):
    """Square orbit cameras looking at the mesh's bounding-sphere centre, far enough that the
    sphere (times `margin`) fits the view (`cameras_around` that sphere)."""
    centre, radius = bounding_sphere(vertices)
    return cameras_around(centre, radius, elevation, azimuth, size, fovy, margin, device)


def cameras_around(
    centre,  # [3] world
    radius: float,
    elevation,  # [C] degrees
    azimuth,  # [C] degrees
    size: int,
    fovy: float,
    margin: float = 1.1,
    device: torch.device | str | None = None,
):
    """render.orbit_cameras moved to `centre`, at the distance where the ball of `radius` (times
    `margin`) fills the square view (poles, el = ±90°, included)."""
    from tdgen.render import orbit_cameras

    dist = radius * margin / math.sin(math.radians(fovy) / 2.0)
    el = torch.as_tensor(np.atleast_1d(np.asarray(elevation, dtype=np.float32)), device=device)
    az = torch.as_tensor(np.atleast_1d(np.asarray(azimuth, dtype=np.float32)), device=device)
    cams = orbit_cameras(el, az, dist, fovy, size, size, device=device)
    # The orbit circles the origin; shift it to the centre (t' = t − R·c).
    c = torch.as_tensor(np.asarray(torch.as_tensor(centre).detach().cpu(), dtype=np.float32),
                        device=cams.viewmats.device)
    viewmats = cams.viewmats.clone()
    viewmats[:, :3, 3] -= viewmats[:, :3, :3] @ c
    return replace(cams, viewmats=viewmats)
