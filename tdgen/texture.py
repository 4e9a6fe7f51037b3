"""Stage 2c: bake the splat's colours into the mesh's UV texture.

Every texel of the UV layout knows its 3D point and normal (the mesh rasterised in UV space). The
splat is rendered from views all around the object; a texel takes a cosine-weighted average of
the colours it projects to in the views that see it (the mesh's own depth map decides
visibility), so a seam between two views blends instead of showing whichever view came first
(DreamGaussian's first-writer-wins bake is what this improves on). Texels inside charts that no
view saw take the nearest seen colour in 3D; gutters take the nearest chart texel in 2D, so
bilinear lookups and mipmaps never pull in black. `transfer_texture` carries a finished texture
over to a simplified, re-unwrapped copy of the mesh (the LODs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tdgen.config import TextureConfig
from tdgen.errors import ConfigError, GenerationError
from tdgen.gaussians import Gaussians
from tdgen.meshdata import Mesh
from tdgen.progress import Progress, ProgressFn, no_progress
from tdgen.raster import (
    bounding_sphere,
    framing_cameras,
    interpolate_ids,
    project,
    rasterize,
    rasterize_uv,
)

BAKE_FOVY = 49.1
"""Field of view of the bake cameras, degrees (the stage-1 training cameras')."""
COS_POWER = 3.0
"""Weight = cos(normal, view)^k · splat alpha: k = 3 favours head-on views strongly enough that a
grazing view's stretched, blurred colours barely count, yet still blends across view seams."""
ALPHA_MIN = 1e-3
"""Splat alpha below which a pixel says nothing about colour (un-premultiplying would blow up)."""
DEPTH_TOL = 0.02
"""Depth-test tolerance as a fraction of the bounding radius (a texel slightly off the rasterised
surface, e.g. at a triangle's grazing edge, still counts as seen)."""
OCCLUDER_SIGMAS = 4.0
"""A view skips texels within this many of the splat's typical Gaussian radii (its median opaque
Gaussian's longest axis, in that view's pixels) of a mesh part in front of them by more than
`OCCLUDER_TOL`: there the splat's soft edge of that part (its colour at alpha below the mesh's
level, with bake weight out to ~4σ) would bleed onto the surface behind, e.g. a mug's red
handle ghosted onto its body; other views see those texels clear. A red ball before a blue one
(tests/test_texture.py): 99th-percentile red on the blue one .40 without, .28 at 2.5σ, .07 at 4σ."""
OCCLUDER_SLOPE_SLACK = 1.5
"""How much nearer than its tangent plane predicts a curved surface may come within the margin
before it counts as a part in front."""
OCCLUDER_MAX_PIXELS = 8
"""Cap on that margin, so a splat of huge Gaussians does not blank whole views."""
OCCLUDER_TOL = 0.05
"""Depth step, as a fraction of the bounding radius, that counts as a part in front (a slanted
surface's own depth changes less over that margin at bake resolutions)."""


def bake_directions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Elevations and azimuths [n] in degrees of the bake views.

    26 gives DreamGaussian's set: 8 azimuths × elevations {−30, 0, 30} + top + bottom. Any other
    count is top + bottom + n − 2 views on a Fibonacci sphere (evenly spread, poles excluded).
    """
    if n == 26:
        az, el = np.meshgrid(np.arange(0.0, 360.0, 45.0), [-30.0, 0.0, 30.0])
        el = np.concatenate([el.ravel(), [90.0, -90.0]])
        az = np.concatenate([az.ravel(), [0.0, 0.0]])
        return el, az
    m = n - 2
    i = np.arange(m)
    y = 1.0 - 2.0 * (i + 0.5) / max(m, 1)
    golden = math.pi * (3.0 - math.sqrt(5.0))
    el = np.concatenate([[90.0, -90.0], np.degrees(np.arcsin(y))])
    az = np.concatenate([[0.0, 0.0], (np.degrees(i * golden) + 180.0) % 360.0 - 180.0])
    return el, az


def fill_gutters(texture: Tensor, mask: Tensor) -> Tensor:
    """Give every texel outside `mask` [S, S] the colour of the nearest texel inside it.

    texture [S, S, C] → [S, S, C]. scipy's exact Euclidean distance transform returns the nearest
    inside texel's index for every texel in one pass, which is all a gutter fill needs.
    """
    from scipy.ndimage import distance_transform_edt

    m = mask.detach().cpu().numpy().astype(bool)
    if m.all() or not m.any():
        return texture
    _, (ri, ci) = distance_transform_edt(~m, return_indices=True)
    ri = torch.from_numpy(ri).to(texture.device)
    ci = torch.from_numpy(ci).to(texture.device)
    return texture[ri, ci]


def chart_mask(mesh: Mesh, size: int, device=None) -> Tensor:
    """[S, S] bool: texels whose centre lies inside a UV triangle."""
    fid, _ = rasterize_uv(
        torch.as_tensor(mesh.uvs, device=device), torch.as_tensor(mesh.faces, device=device), size
    )
    return fid >= 0


def _texel_geometry(mesh: Mesh, size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Covered texel indices [T] (flat into S·S), their 3D points [T, 3] and unit normals [T, 3]."""
    verts = torch.as_tensor(mesh.vertices, device=device).float()
    faces = torch.as_tensor(mesh.faces, device=device).long()
    fid, bary = rasterize_uv(torch.as_tensor(mesh.uvs, device=device).float(), faces, size)
    idx = torch.nonzero(fid.reshape(-1) >= 0).squeeze(1)
    if len(idx) == 0:
        raise GenerationError(
            "the mesh's UV layout covers no texel; raise texture.size or re-run the unwrap"
        )
    fid_t = fid.reshape(-1)[idx]
    bary_t = bary.reshape(-1, 3)[idx]
    points = interpolate_ids(verts, faces, fid_t, bary_t)  # [T, 3]
    tri = verts[faces[fid_t]]  # [T, 3, 3]
    face_n = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    normals = interpolate_ids(torch.as_tensor(mesh.normals, device=device).float(), faces, fid_t, bary_t)
    # Vertex normals give smooth weights; a degenerate (zero) one falls back to the face's.
    ok = normals.norm(dim=-1, keepdim=True) > 1e-6
    normals = torch.where(ok, F.normalize(normals, dim=-1), face_n)
    return idx, points, normals


def _texture_from_texels(colours: Tensor, idx: Tensor, size: int) -> Tensor:
    """[size, size, 3]: `colours` [T, 3] at the covered texels `idx` [T] (flat into size²),
    clamped to [0, 1], gutters filled from the nearest chart texel."""
    texture = torch.zeros(size * size, 3, device=colours.device)
    texture[idx] = colours.clamp(0.0, 1.0)
    mask = torch.zeros(size * size, dtype=torch.bool, device=colours.device)
    mask[idx] = True
    return fill_gutters(texture.view(size, size, 3), mask.view(size, size))


def _typical_radius(g: Gaussians) -> float:
    """The median opaque Gaussian's longest axis (world units): how far its soft edge reaches."""
    s = torch.exp(g.scales[g.bulk()].float()).amax(-1)  # [M]
    return float(s.median()) if len(s) else 0.0


def _sample_image(img: Tensor, xy: Tensor) -> Tensor:
    """Bilinear lookup of img [H, W, D] at pixel coordinates xy [T, 2] (centres at i + .5) → [T, D]."""
    H, W = img.shape[:2]
    grid = torch.stack((xy[:, 0] / W * 2 - 1, xy[:, 1] / H * 2 - 1), dim=-1)
    out = F.grid_sample(img.permute(2, 0, 1)[None], grid[None, :, None, :], mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T


@torch.no_grad()
def bake_texture(
    g: Gaussians,
    mesh: Mesh,  # with uvs
    cfg: TextureConfig,
    device,
    on_progress: ProgressFn = no_progress,
) -> Tensor:
    """The splat's colours on the mesh's UV layout: texture [S, S, 3] float32 in [0, 1], row 0 = top."""
    from tdgen.render import render_gaussians

    if mesh.uvs is None:
        raise GenerationError("the mesh has no UVs; run unwrap_mesh before bake_texture")
    if cfg.bake_views < 3:
        raise ConfigError(
            f"texture.bake_views must be at least 3 (top, bottom and a side), got {cfg.bake_views}; "
            "use e.g. 26"
        )
    device = torch.device(device)
    S, R = int(cfg.size), int(cfg.bake_resolution)
    g = g.to(device)
    verts = torch.as_tensor(mesh.vertices, device=device).float()
    faces = torch.as_tensor(mesh.faces, device=device).long()

    # 1. each texel's 3D point and normal
    idx, points, normals = _texel_geometry(mesh, S, device)  # [T], [T, 3], [T, 3]

    # 2. cameras around the mesh's bounding sphere (any input .ply: not assumed at the origin)
    el, az = bake_directions(int(cfg.bake_views))
    cams = framing_cameras(mesh.vertices, el, az, R, fovy=BAKE_FOVY, device=device)
    centre, radius = bounding_sphere(mesh.vertices)
    centre = torch.as_tensor(centre, device=device, dtype=torch.float32)
    sigma = _typical_radius(g)
    n = len(cams)
    on_progress(Progress("bake", 0, n, message=f"{n} views at {R}²"))

    # 3. cosine-weighted accumulation over the views
    colour_sum = torch.zeros(len(idx), 3, device=device)
    weight_sum = torch.zeros(len(idx), device=device)
    black = torch.zeros(1, 3, device=device)
    for c in range(n):
        cam = cams.index(slice(c, c + 1))
        out = render_gaussians(g, cam, black)
        alpha = out.alpha[0].float()  # [R, R, 1]
        # Black background: rgb is premultiplied by alpha; divide it back out.
        rgb = (out.rgb[0].float() / alpha.clamp_min(ALPHA_MIN)).clamp(0.0, 1.0)
        rgb = torch.where(alpha > ALPHA_MIN, rgb, torch.zeros_like(rgb))
        depth = rasterize(verts, faces, cam).depth[0]  # [R, R] camera z of the nearest surface

        xy, z = project(points, cam)
        xy, z = xy[0], z[0]  # [T, 2], [T]
        px = xy[:, 0].floor().long()
        py = xy[:, 1].floor().long()
        inside = (px >= 0) & (px < R) & (py >= 0) & (py < R) & (z > 0)
        surf = depth[py.clamp(0, R - 1), px.clamp(0, R - 1)]
        # The tolerance grows with the pixel footprint (z / f) so far or coarse views still match.
        tol = torch.clamp_min(2.0 * z / cam.Ks[0, 0, 0], DEPTH_TOL * radius)
        # Nearest mesh depth within the splat's soft edge (background is +inf, so an object's
        # own silhouette against the background does not count).
        dist = float((cam.positions[0] - centre).norm())
        r_px = int(min(OCCLUDER_MAX_PIXELS, max(1, math.ceil(OCCLUDER_SIGMAS * sigma * float(cam.Ks[0, 0, 0]) / dist))))
        nearest = -F.max_pool2d(-depth[None, None], 2 * r_px + 1, stride=1, padding=r_px)[0, 0]
        near_occ = nearest[py.clamp(0, R - 1), px.clamp(0, R - 1)]
        to_cam = F.normalize(cam.positions[0][None] - points, dim=-1)
        cos = (normals * to_cam).sum(-1)
        # The texel's own surface, slanted by θ, comes nearer by up to r·footprint·tan θ within
        # the margin (a sphere towards its limb); only a step beyond that is a part in front.
        tan = (1.0 - cos * cos).clamp_min(0.0).sqrt() / cos.clamp_min(0.1)
        slope = OCCLUDER_SLOPE_SLACK * r_px * (z / cam.Ks[0, 0, 0]) * tan
        clear = (z - near_occ) <= torch.clamp_min(tol, OCCLUDER_TOL * radius) + slope
        visible = inside & ((z - surf).abs() <= tol) & clear
        sel = torch.nonzero(visible & (cos > 0)).squeeze(1)
        if len(sel):
            look = _sample_image(torch.cat([rgb, alpha], dim=-1), xy[sel])  # [t, 4]
            w = cos[sel].pow(COS_POWER) * look[:, 3]
            colour_sum.index_add_(0, sel, look[:, :3] * w[:, None])
            weight_sum.index_add_(0, sel, w)
        on_progress(Progress("bake", c + 1, n, message=f"view {c + 1}/{n}"))

    # 4. average, then fill what no view saw (nearest in 3D) and the gutters (nearest in 2D)
    seen = weight_sum > 1e-6
    if not bool(seen.any()):
        raise GenerationError(
            "no texel of the mesh was seen in any bake view (the splat and the mesh do not "
            "overlap); make the mesh from the same splat"
        )
    colours = colour_sum / weight_sum.clamp_min(1e-12)[:, None]
    if not bool(seen.all()):
        from scipy.spatial import cKDTree

        src = points[seen].cpu().numpy()
        dst = points[~seen].cpu().numpy()
        _, nearest = cKDTree(src).query(dst, k=1)
        seen_ids = torch.nonzero(seen).squeeze(1)
        colours[~seen] = colours[seen_ids[torch.from_numpy(nearest).to(device)]]
    return _texture_from_texels(colours, idx, S)


TRANSFER_SAMPLES_PER_TEXEL = 4
"""Surface samples of the source mesh per destination texel in `transfer_texture`: their spacing
stays under the destination's texel size, so the nearest sample is as good as the nearest point."""
TRANSFER_NEIGHBOURS = 8
"""Nearest source samples considered per texel; the first one facing the texel's side is taken,
so a thin part's far face (a few mm away) never lends its colour to the near one."""


@torch.no_grad()
def transfer_texture(src: Mesh, src_texture: Tensor, dst: Mesh, size: int, device=None,
                     seed: int = 0) -> Tensor:
    """The texture [size, size, 3] of `dst` (a simplified, re-unwrapped copy of `src`'s surface)
    that shows `src`'s texture [S, S, 3]: each texel takes the colour of the nearest point of `src`
    facing the same way (the high-to-low-poly bake games use for LODs), gutters filled.

    Why not shared UVs: a decimation that keeps `src`'s UVs must hold every seam vertex, and on
    our atlases those are 37–49 % of the vertices, so LODs stopped halving after the first."""
    import trimesh
    from scipy.spatial import cKDTree

    idx, points, normals = _texel_geometry(dst, size, device)  # [T], [T, 3], [T, 3]
    tm = trimesh.Trimesh(src.vertices, src.faces, process=False)
    n = max(100_000, TRANSFER_SAMPLES_PER_TEXEL * len(idx))
    pts, fidx = trimesh.sample.sample_surface(tm, n, seed=seed)  # [n, 3], [n]
    tri = tm.triangles[fidx]  # [n, 3, 3]
    bary = trimesh.triangles.points_to_barycentric(tri, pts)  # [n, 3]
    uv = np.einsum("nk,nkd->nd", bary, src.uvs[src.faces[fidx]])  # [n, 2]
    fn = tm.face_normals[fidx]  # [n, 3]

    p = points.cpu().numpy().astype(np.float64)
    nrm = normals.cpu().numpy().astype(np.float64)
    k = min(TRANSFER_NEIGHBOURS, n)
    _, nb = cKDTree(pts).query(p, k=k)  # [T, k], nearest first
    nb = nb.reshape(len(p), k)
    facing = np.einsum("tkd,td->tk", fn[nb], nrm) > 0.0
    pick = np.where(facing.any(1), facing.argmax(1), 0)  # nearest facing sample, else nearest
    chosen = nb[np.arange(len(p)), pick]
    S = int(src_texture.shape[0])
    xy = torch.as_tensor(uv[chosen] * S, dtype=torch.float32, device=src_texture.device)
    colours = _sample_image(src_texture.float(), xy).to(points.device)  # [T, 3]

    return _texture_from_texels(colours, idx, size)
