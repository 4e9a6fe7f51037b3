"""Splat → signed-distance volume by depth fusion (the default surface of stage 2a).

The splat is rendered from views spread over the whole sphere; each view's depth, the camera z
where a pixel's ray has accumulated `alpha` (`twin.render_depth`: each Gaussian's opacity ramps up
along the ray, so this is the surface the splat shows, not its Gaussians' centres), says for every
voxel it sees how far in front of (+) or behind (−) the visible surface the voxel lies.
Averaging those truncated distances over the views (a TSDF, as 2DGS-style pipelines fuse depth)
gives a field whose zero level is the splat's *visible* surface, whatever the Gaussians' shape:
flat surfels, which a density iso-surface samples with aliasing holes, come out as solid as
blobby SDS splats. Unlike a plain TSDF the field is defined everywhere, so the mesh is closed:
a voxel that (nearly) every view sees only far behind a surface is inside (`OBSERVED_RATIO`),
so a pinhole seen by a view or two does not carve a tunnel into a hollow shell (which would give
it an inner wall) — unless at least `FREE_VIEWS` views see it in front of their surface once
that surface's pinholes are closed (`CLOSE_VOXELS`): the inside of a deep open container, which
only views from above see into.
Faint haze (alpha below `alpha` in every view) is never a surface; far floaters are dropped before
(mesh.py) and small opaque ones become small pieces that the clean step removes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tdgen.gaussians import Gaussians
from tdgen.progress import Progress, ProgressFn, no_progress

FOVY = 40.0
"""Field of view of the fusion cameras, degrees: narrow enough that depth is sampled nearly
uniformly across the object, wide enough that cameras stay well clear of it."""

MARGIN = 1.05
"""The volume's bounding sphere times this fills each view."""

OBSERVED_RATIO = 0.1
"""A voxel counts as observed (its fused distance is used) when more than this fraction as many
views see it free or near a surface as see it far behind one; otherwise it is inside. Near 0 a
few views through a pinhole carve a tunnel into a hollow shell (an inner wall); near 1
concavities seen by few views (a bowl's inside) fill up."""

FREE_VIEWS = 2
"""A voxel that at least this many views see in front of their pinhole-closed surface
(`CLOSE_VOXELS`) is outside, however many views it is hidden from: the inside of a deep open
container (a crate, a cup) is seen by a few views from above only, too few for
`OBSERVED_RATIO` (the built-in crate, 2 cm walls, 60k surfels, `standard` on the CPU: F@1 %
.754 → .914; benchmarks/results/cpu-2026-12-07d-open-shapes). One view alone carves more
(another 2 cm crate: .912 → .943) but also the inside of a narrow-necked vase down to its floor
through the neck's shadow (F .693 → .635), and sparse hollow shells get inner walls; two keep
both as they were (0 disables the rule)."""

FREE_MARGIN = 0.0
"""How far (voxels) in front of a view's closed surface a voxel must lie for that view to count
it free (`FREE_VIEWS`). The closing already keeps pinholes from counting, and a closed depth
never lies behind the raw one, so no margin is needed; one voxel (as for distance votes) kept
the voxels just in front of a crate's inner walls and floor inside, where only a few views from
above see them: the walls grew a voxel into the cavity (60k-surfel crate, `standard`, CPU:
F@1 % .914 → .978 without the margin; the other objects as before or better)."""

CLOSE_VOXELS = 2.0
"""Holes in a view's surface up to about twice this many voxels across are closed (a grey closing
of its depth) before the view may carve free space: gaps between sparse surfels let a view or two
see into a hollow splat, and a carve through them would leave an inner wall."""

CLOSE_SPREAD = 2.0
"""The closing's radius is at least this many times the splat's typical in-plane axis: the gaps
between Gaussians scale with the Gaussians, not with the voxels. Without any closing, two views
through gaps carve sparse surfel shells hollow (2500 discs on a 1 m sphere: volume 0.30 of the
ball at `standard`); with 2 voxels alone, one such shell grew inner walls (area ×1.23); with
this, every shell tried meshes about as it did without the rule."""

BEHIND_VOXELS = 1.0
"""A view votes on a voxel's distance only down to this many voxels behind the surface it sees;
deeper, the voxel is merely "occluded" for it. A slab thinner than the truncation would otherwise
get votes from its far side on the voxels just outside its near side, and grow by about the
truncation minus its thickness."""

COS_POWER = 8.0
"""A surface vote counts cos^k of the angle between the view ray and the surface normal."""

BACKGROUND_WEIGHT = 0.05
"""Weight of a "free" vote (the pixel sees no surface). Alone, any weight makes a voxel outside;
beside surface votes it must not win: a voxel just inside a surface lies on the silhouette of the
views that graze it there, and at the silhouette's soft edge those see background."""

EDGE_VOXELS = 2.0
"""Pixels whose depth jumps by more than this many voxels to a neighbour lie on a depth edge,
where a pixel may read either surface; they vote for neither."""

SMOOTH_SCALE = 1.0
"""The fused field's blur is this many times the splat's typical thickness (`smoothing_voxels`).
On case-B splats (photometric fits; median shortest axis 0.4–1.4 cm, voxels ~0.7 cm) 1.5–2 voxels
of blur took F@1 % from .40 to .65–.70 (table) and from .87 to .99 (torus), CPU twin; more (1.5×)
erased a part 3 cm across (`tests/test_mesh.py`)."""

SMOOTH_IN_PLANE = 0.6
"""The blur is at least this many times the splat's typical in-plane axis (`smoothing_voxels`):
2500 surfels on a 1 m mug (discs 2.5 cm across at 2 cm voxels) left its lid wavy by ±3 cm, which
the height normalisation turned into a 10 % smaller mug (F@1 % .14); 0.6 of the disc size
(0.74 voxels) took its height error from 10 % to 3.6 %."""

SMOOTH_MAX_VOXELS = 3.0
"""Cap on that blur: wider would round off parts a few voxels thick."""

_VIEWS_PER_RENDER = {"cuda": 64, "cpu": 1}
"""Views rendered per call: batched on the GPU (one pass of kernels for all), one at a time on
the CPU (bounded memory)."""


def sphere_directions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Elevations and azimuths [n] (degrees) of `n` views spread evenly over the sphere
    (a Fibonacci lattice, poles included as its first and last points)."""
    i = np.arange(n, dtype=np.float64)
    y = 1.0 - 2.0 * i / max(n - 1, 1)  # +1 … −1: top view first, bottom view last
    golden = math.pi * (3.0 - math.sqrt(5.0))
    el = np.degrees(np.arcsin(np.clip(y, -1.0, 1.0)))
    az = (np.degrees(i * golden) + 180.0) % 360.0 - 180.0
    return el, az


def volume_box(g: Gaussians, grid: int, pad_voxels: int) -> tuple[Tensor, float, Tensor, float]:
    """Origin [3] (world position of voxel (0, 0, 0)) and edge length of a cubic `grid`³ lattice
    around the splat: centres ± 2σ (a splat's visible surface lies within that), a huge splat's
    reach capped at a tenth of the centres' extent, `pad_voxels` empty voxels on every side; and
    the centre [3] and radius of a ball holding all of that, which the views frame."""
    means = g.means.float()
    sigma = torch.exp(g.scales.float()).amax(-1, keepdim=True)  # [N, 1]
    span = float((means.amax(0) - means.amin(0)).max().clamp_min(1e-6))
    reach = (2.0 * sigma).clamp_max(0.1 * span)  # [N, 1]
    lo, hi = (means - reach).amin(0), (means + reach).amax(0)
    extent = float((hi - lo).max().clamp_min(1e-6))
    voxel = extent / (grid - 1 - 2 * pad_voxels)
    centre = 0.5 * (lo + hi)
    origin = centre - 0.5 * (grid - 1) * voxel
    radius = float(((means - centre).norm(dim=-1, keepdim=True) + reach).max()) + voxel
    return origin, voxel, centre, radius


def fusion_cameras(centre: Tensor, radius: float, views: int, resolution: int):
    """`views` square cameras on a sphere around `centre` [3], each framing the ball of `radius`."""
    from tdgen.raster import cameras_around

    el, az = sphere_directions(views)
    return cameras_around(centre, radius, el, az, resolution, FOVY, MARGIN, device=centre.device)


def _view_cosines(depth: Tensor, K: Tensor) -> Tensor:  # [H, W], [3, 3] → [H, W]
    """|cos| between each pixel's ray and the normal of the depth map's surface there.

    Slanted views read a surface less well (a splat's footprint stretches along it and the
    nearest splats win the compositing), so their votes count less (`COS_POWER`)."""
    H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, device=depth.device, dtype=depth.dtype) + 0.5,
                          torch.arange(W, device=depth.device, dtype=depth.dtype) + 0.5, indexing="ij")
    rays = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
    p = rays * depth[..., None]  # [H, W, 3] camera-frame points
    du = torch.zeros_like(p)
    dv = torch.zeros_like(p)
    du[:, 1:-1] = p[:, 2:] - p[:, :-2]
    dv[1:-1] = p[2:] - p[:-2]
    n = torch.nn.functional.normalize(torch.linalg.cross(du, dv), dim=-1)
    return (n * torch.nn.functional.normalize(rays, dim=-1)).sum(-1).abs()


def _bilinear_depth(depth: Tensor, ok: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """depth [H, W] at continuous pixel coordinates x, y [M] (pixel centres at i + 0.5), NaN
    where any of the four pixels around the point is not `ok` [H, W]."""
    H, W = depth.shape
    fx, fy = x - 0.5, y - 0.5
    x0, y0 = torch.floor(fx).long(), torch.floor(fy).long()
    ax, ay = fx - x0, fy - y0
    flat_d, flat_ok = depth.reshape(-1), ok.reshape(-1)
    out = torch.zeros_like(x)
    good = torch.ones_like(x, dtype=torch.bool)
    for dx, dy, w in ((0, 0, (1 - ax) * (1 - ay)), (1, 0, ax * (1 - ay)), (0, 1, (1 - ax) * ay), (1, 1, ax * ay)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        idx = yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)
        good &= inside & flat_ok[idx]
        out += w * flat_d[idx]
    return torch.where(good, out, torch.full_like(out, float("nan")))


def _close_holes(depth: Tensor, radius_px: float) -> Tensor:  # [H, W] → [H, W]
    """A grey closing of `depth` (+inf where no surface): a minimum filter, then a maximum filter,
    each over a (2r+1)² window, r = `radius_px` rounded. Holes narrower than the window (far
    pixels among near ones) take their surroundings' depth; slopes, silhouettes and openings wider
    than the window come back as they were, unlike after the minimum filter alone."""
    r = round(radius_px)
    if r < 1:
        return depth
    pool = torch.nn.functional.max_pool2d
    nearest = -pool(-depth[None, None], 2 * r + 1, 1, r)
    return pool(nearest, 2 * r + 1, 1, r)[0, 0]


def _depth_edges(depth: Tensor, surf: Tensor, tol: float) -> Tensor:  # [H, W] ×2 → [H, W] bool
    """Surface pixels next to a surface pixel more than `tol` nearer or farther."""
    d = torch.where(surf, depth, torch.full_like(depth, float("nan")))
    p = torch.nn.functional.pad(d[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    jump = torch.zeros_like(surf)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = p[dy : dy + d.shape[0], dx : dx + d.shape[1]]
        jump |= (nb - d).abs() > tol  # NaN (a background neighbour) compares False
    return jump & surf


@torch.no_grad()
def fuse_depth(
    g: Gaussians,  # on the device the work runs on
    grid: int,
    views: int,
    resolution: int,
    truncation: float,  # voxels
    alpha: float,
    pad_voxels: int = 2,
    on_progress: ProgressFn = no_progress,
) -> tuple[Tensor, Tensor, float]:
    """Fused truncated signed distance, positive *inside* (so marching cubes at 0 winds faces as
    for a density), `[G, G, G]` indexed [x, y, z] in voxel units clamped to ±`truncation`; with the
    lattice origin [3] and voxel edge, as `density.density_grid` returns them."""
    from tdgen.twin import render_depth

    device = g.means.device
    origin, voxel, centre, radius = volume_box(g, grid, pad_voxels)
    cams = fusion_cameras(centre, radius, views, resolution)
    T = truncation * voxel
    Tb = min(BEHIND_VOXELS, truncation) * voxel

    axis = torch.arange(grid, device=device, dtype=torch.float32) * voxel
    # Voxel centres in world space, x-major like the lattice: [G³, 3]
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + origin
    sdf_sum = torch.zeros(len(pts), device=device)
    w_sum = torch.zeros(len(pts), device=device)
    framed = torch.zeros(len(pts), dtype=torch.bool, device=device)  # inside some view's frustum
    n_near = torch.zeros(len(pts), dtype=torch.int32, device=device)  # views: free or near a surface
    n_occluded = torch.zeros(len(pts), dtype=torch.int32, device=device)  # views: far behind one
    n_free = torch.zeros(len(pts), dtype=torch.int32, device=device)  # views: before a closed surface
    axes = _typical_axes(g)
    # The closing's radius in world units, and in pixels at the splat's centre for each view
    # (once here: a per-view readback would sync the device in the loop below).
    close_r = max(CLOSE_VOXELS * voxel, CLOSE_SPREAD * axes[1])
    R_all, t_all = cams.viewmats[:, :3, :3], cams.viewmats[:, :3, 3:]
    cam_centres = -(R_all.transpose(1, 2) @ t_all)[..., 0]  # [C, 3]: −Rᵀt
    close_px = (close_r * cams.Ks[:, 0, 0] / (cam_centres - centre).norm(dim=-1).clamp_min(1e-9)).tolist()
    per_call = _VIEWS_PER_RENDER["cuda" if device.type == "cuda" else "cpu"]
    H = W = resolution
    for c0 in range(0, len(cams), per_call):
        sel = slice(c0, min(c0 + per_call, len(cams)))
        view = cams.index(sel)
        alphas, depths = render_depth(g, view, alpha)
        for k in range(alphas.shape[0]):
            c = c0 + k
            a_img = alphas[k, ..., 0].float()  # [H, W]
            d_img = depths[k, ..., 0].float()  # [H, W] camera z where the ray's alpha reaches `alpha`
            surf = a_img >= alpha
            edge = _depth_edges(d_img, surf, EDGE_VOXELS * voxel)
            # Surface pixels vote by their slant, background pixels ("free") weakly: see BACKGROUND_WEIGHT.
            w_img = torch.where(surf, _view_cosines(d_img, cams.Ks[c]).pow(COS_POWER), BACKGROUND_WEIGHT)
            R, t = cams.viewmats[c, :3, :3], cams.viewmats[c, :3, 3]
            pc = pts @ R.T + t  # [M, 3] camera frame
            z = pc[:, 2]
            K = cams.Ks[c]
            zs = z.clamp_min(1e-6)
            x = K[0, 0] * pc[:, 0] / zs + K[0, 2]  # [M] continuous pixel coordinates
            y = K[1, 1] * pc[:, 1] / zs + K[1, 2]
            u, v = torch.floor(x).long(), torch.floor(y).long()
            seen = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z > 0)
            pix = v.clamp(0, H - 1) * W + u.clamp(0, W - 1)
            hit = surf.reshape(-1)[pix]
            depth = _bilinear_depth(d_img, surf & ~edge, x, y)
            # Bilinear where all four neighbours are plain surface (slanted surfaces read a pixel's
            # worth too near or far otherwise), else the pixel's own value.
            depth = torch.where(torch.isnan(depth), d_img.reshape(-1)[pix], depth)
            sd = torch.where(hit, depth - z, torch.full_like(z, T))
            vote = seen & ~edge.reshape(-1)[pix]
            framed |= seen
            near = vote & (sd >= -Tb)
            w = torch.where(near, w_img.reshape(-1)[pix], 0.0)
            sdf_sum += w * sd.clamp(-Tb, T)
            w_sum += w
            n_near += near
            n_occluded += vote & (sd < -Tb)
            if FREE_VIEWS > 0:
                closed = _close_holes(torch.where(surf, d_img, torch.full_like(d_img, float("inf"))),
                                      close_px[c])
                n_free += seen & (z < closed.reshape(-1)[pix] - FREE_MARGIN * voxel)
        on_progress(Progress("grid", sel.stop, len(cams), message=f"fusion view {sel.stop}/{len(cams)}"))
    # The distance is the weighted mean of the near votes alone (occluded votes would bias it
    # outward). Where too few views see a voxel as free or near a surface — behind every surface,
    # or seen only through a pinhole — it is inside, unless no view frames it at all (a lattice
    # corner beyond the splat's ball) or `FREE_VIEWS` views see it in front of their closed
    # surface: then it is outside, even with no distance vote of its own (seen free only across
    # depth edges, which cast none: a crate's rim seen from above against its floor).
    free = n_free >= max(FREE_VIEWS, 1)
    observed = ((n_near > OBSERVED_RATIO * n_occluded) | free) & (w_sum > 0)
    default = torch.where(framed & ~free, -T, T)
    field = torch.where(observed, sdf_sum / w_sum.clamp_min(1e-12), default)
    out = (-field / voxel).reshape(grid, grid, grid)
    return _smooth(out, smoothing_voxels(g, voxel, axes)), origin, voxel


def smoothing_voxels(g: Gaussians, voxel: float,
                     axes: tuple[float, float, float] | None = None) -> float:
    """Std-dev, in voxels, of the blur the fused field gets: the larger of `SMOOTH_SCALE` times
    the median opaque Gaussian's shortest axis and `SMOOTH_IN_PLANE` times its middle one, at most
    `SMOOTH_MAX_VOXELS`. Detail finer than the Gaussians that draw it is not detail: a blobby
    splat's visible surface is as bumpy as its blobs are thick, and sparse flat surfels (discs
    wider than a voxel) leave a wave of their own size where their planes meet. Dense surfels
    (discs under a voxel) get next to none, so thin parts stay as they are."""
    med = _typical_axes(g) if axes is None else axes  # `axes`: _typical_axes(g), if already known
    return min(SMOOTH_MAX_VOXELS, max(SMOOTH_SCALE * float(med[0]), SMOOTH_IN_PLANE * float(med[1])) / voxel)


def _typical_axes(g: Gaussians) -> tuple[float, float, float]:
    """Median shortest, middle and longest std-dev of the opaque Gaussians (0s if none)."""
    s = torch.exp(g.scales[g.bulk()].float()).sort(-1).values  # [M, 3] shortest, middle, longest
    if len(s) == 0:
        return 0.0, 0.0, 0.0
    med = s.median(0).values
    return float(med[0]), float(med[1]), float(med[2])


def _smooth(field: Tensor, sigma: float) -> Tensor:  # [G, G, G] → [G, G, G]
    """Separable Gaussian blur of std-dev `sigma` voxels (none below a tenth of a voxel); the
    border repeats, so the outside layer stays outside."""
    if sigma < 0.1:
        return field
    r = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-r, r + 1, device=field.device, dtype=field.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = field[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out[0, 0]
