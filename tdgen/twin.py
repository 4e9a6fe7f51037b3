"""The pure-PyTorch twin of gsplat's 3DGS rasterizer: the same projection, tiles and compositing
in dense tensor ops, so that stage 1 runs on the CPU (tests, CI) and autograd gives the backward.
gsplat's own compositing has no CPU path, and its `_torch_impl` einsums are ~10× slower here.
It also renders the one output gsplat lacks: the depth where a ray's alpha crosses a level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tdgen.gaussians import C0, Gaussians, quat_to_rotmat

if TYPE_CHECKING:
    from tdgen.render import Cameras

NEAR_PLANE = 0.01
"""Gaussians closer to the camera than this are culled (gsplat's default)."""
EPS2D = 0.3
"""Screen-space blur added to every 2D covariance, pixels² (gsplat's `eps2d`)."""
ALPHA_MIN = 1.0 / 255.0
"""Per-splat alphas below this are skipped (gsplat's ALPHA_THRESHOLD)."""
ALPHA_MAX = 0.999
"""Per-splat alpha cap (gsplat's CUDA kernel; INRIA uses 0.99)."""
T_MIN = 1e-4
"""A pixel stops compositing when its transmittance would fall to this (gsplat)."""
CPU_TILE = 8
"""Tile edge for the CPU twin: dense per-tile work wastes less on small splats with 8×8 tiles
(0.45 vs 0.8 CPU-s per 256² view at 60k splats); the image is the same either way."""



def project(g: Gaussians, cams: Cameras, opac: Tensor):
    """EWA splatting projection, the maths of gsplat's fused 3DGS projection kernel.

    Returns means2d [C,N,2], conics [C,N,3] (a, b, c of Σ2d⁻¹), depths [C,N], radii [C,N,2] int.
    Written with batched matmuls rather than gsplat's `_torch_impl` einsums, which are ~10×
    slower on CPU at 60k splats.
    """
    W, H = cams.width, cams.height
    rs = quat_to_rotmat(g.quats) * torch.exp(g.scales)[:, None, :]  # [N, 3, 3], Σ = rs rsᵀ
    R, t = cams.viewmats[:, :3, :3], cams.viewmats[:, :3, 3]  # [C, 3, 3], [C, 3]
    means_c = g.means[None] @ R.transpose(1, 2) + t[:, None]  # [C, N, 3]
    depths = means_c[..., 2]  # [C, N]
    # Splats behind the near plane are culled below; a clamped z keeps their (unused) projection
    # finite so no NaN leaks into the backward pass.
    z = depths.clamp_min(NEAR_PLANE)
    fx, fy = cams.Ks[:, 0, 0, None], cams.Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = cams.Ks[:, 0, 2, None], cams.Ks[:, 1, 2, None]
    means2d = torch.stack([fx * means_c[..., 0] / z + cx, fy * means_c[..., 1] / z + cy], -1)
    # The Jacobian is evaluated at a point clamped to 1.3× the view frustum (gsplat / INRIA), so
    # splats far off-screen do not get huge footprints.
    lim_x = 1.3 * (0.5 * W / fx)
    lim_y = 1.3 * (0.5 * H / fy)
    tx = z * (means_c[..., 0] / z).clamp(-lim_x, lim_x)
    ty = z * (means_c[..., 1] / z).clamp(-lim_y, lim_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], -1)
    A = J.reshape(*z.shape, 2, 3) @ (R[:, None] @ rs[None])  # [C, N, 2, 3]; Σ2d = A Aᵀ
    a = (A[..., 0, :] * A[..., 0, :]).sum(-1) + EPS2D
    b = (A[..., 0, :] * A[..., 1, :]).sum(-1)
    c = (A[..., 1, :] * A[..., 1, :]).sum(-1) + EPS2D
    det = a * c - b * b
    inv_det = 1.0 / det.clamp_min(1e-10)
    conics = torch.stack([c * inv_det, -b * inv_det, a * inv_det], -1)  # [C, N, 3]

    with torch.no_grad():
        # Opacity-aware 3σ box (gsplat ≥ 1.4, arXiv:2402.00525 B.2): faint splats, small boxes.
        o = opac.detach()[None].expand_as(depths)
        extend = torch.sqrt(2.0 * torch.log((o / ALPHA_MIN).clamp_min(1.0))).clamp_max(3.33)
        radii = torch.stack([torch.ceil(extend * a.sqrt()), torch.ceil(extend * c.sqrt())], -1)
        m = means2d.detach()
        valid = (
            (det > 0) & (depths > NEAR_PLANE) & (o >= ALPHA_MIN)
            & (m[..., 0] + radii[..., 0] > 0) & (m[..., 0] - radii[..., 0] < W)
            & (m[..., 1] + radii[..., 1] > 0) & (m[..., 1] - radii[..., 1] < H)
            & ((radii > 0).any(-1))
        )
        radii = torch.where(valid[..., None], radii, 0.0).int()  # [C, N, 2]
    return means2d, conics, depths, radii


def view_colors(g: Gaussians, cams: Cameras) -> Tensor:  # [C, N, 3] view-dependent RGB, ≥ 0
    C = len(cams)
    if g.sh_degree == 0:
        rgb = (C0 * g.sh0 + 0.5).clamp_min(0.0)
        return rgb[None].expand(C, -1, -1)
    from gsplat.cuda._torch_impl import _spherical_harmonics  # pure torch, no CUDA

    dirs = g.means[None] - cams.positions[:, None]  # [C, N, 3]
    coeffs = g.colors()[None].expand(C, -1, -1, -1)  # [C, N, K+1, 3]
    return (_spherical_harmonics(g.sh_degree, dirs, coeffs) + 0.5).clamp_min(0.0)


def render_views(g: Gaussians, cams: Cameras, backgrounds: Tensor):  # backgrounds [C, 3]
    """rgb [C,H,W,3], alpha [C,H,W,1], expected depth [C,H,W,1] and gsplat's `info` dict."""
    opac = torch.sigmoid(g.opacities)  # [N]
    means2d, conics, depths, radii = project(g, cams, opac)
    colors = view_colors(g, cams)
    rgbs, alphas, zs = [], [], []
    for c in range(len(cams)):
        rgb, alpha, depth = rasterize_view(
            means2d[c], conics[c], colors[c], opac, depths[c], radii[c], backgrounds[c],
            cams.width, cams.height,
        )
        rgbs.append(rgb)
        alphas.append(alpha)
        zs.append(depth)
    info = {
        "means2d": means2d,
        "radii": radii,
        "depths": depths,
        "conics": conics,
        "width": cams.width,
        "height": cams.height,
        "n_cameras": len(cams),
        "gaussian_ids": None,
        "tile_size": CPU_TILE,
    }
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(zs), info


# Work per chunk, in elements of the [tiles, pixels, splats] tensors: larger is faster until
# memory bandwidth wins; 2²² keeps each intermediate at 16 MB.
_GROUP_ELEMENTS = 1 << 22
_GROUP_ELEMENTS_CUDA = 1 << 25
"""On a GPU fewer, larger passes win (kernel launches and host syncs dominate); 128 MB each."""
_CHUNK = 128
"""Splats composited per tile per pass (at least); a tile leaves once all its pixels are opaque."""


def rasterize_view(means2d, conics, colors, opac, depths, radii, background, width, height,
                   cross_level: float | None = None, tile_rows: Tensor | None = None):
    """Front-to-back alpha compositing of one view, tile by tile (gsplat's classic 3DGS kernel).

    means2d [N,2], conics [N,3], colors [N,D], opac [N], depths [N], radii [N,2] int,
    background [D] → rgb [H,W,D], alpha [H,W,1], depth [H,W,1]; with `cross_level`, also, per
    pixel [H, W], the splat whose alpha takes the pixel's accumulated alpha past that level (−1:
    none), its alpha there and the transmittance before it (see `render_depth`); compositing
    then stops soon after the crossing, so where alpha reaches the level the outputs are partial
    sums (alpha ≥ the level, not the pixel's total). `tile_rows`
    [N, 2] bounds each splat's tile rows (several views stacked into one tall image).
    """
    device = means2d.device
    tw, th = -(-width // CPU_TILE), -(-height // CPU_TILE)
    P = CPU_TILE * CPU_TILE

    with torch.no_grad():
        ids = torch.nonzero((radii > 0).all(-1))[:, 0]  # visible splats
        m = means2d.detach()[ids]
        r = radii[ids].float()
        x0 = torch.floor((m[:, 0] - r[:, 0]) / CPU_TILE).clamp(0, tw).long()
        x1 = torch.ceil((m[:, 0] + r[:, 0]) / CPU_TILE).clamp(0, tw).long()
        y0 = torch.floor((m[:, 1] - r[:, 1]) / CPU_TILE).clamp(0, th).long()
        y1 = torch.ceil((m[:, 1] + r[:, 1]) / CPU_TILE).clamp(0, th).long()
        if tile_rows is not None:
            lo, hi = tile_rows[ids, 0], tile_rows[ids, 1]
            y0, y1 = torch.minimum(torch.maximum(y0, lo), hi), torch.minimum(torch.maximum(y1, lo), hi)
        nx = x1 - x0
        n_tiles = nx * (y1 - y0)  # [M] tiles each splat's box touches
        # Depth order first, so a stable sort by tile keeps front-to-back order within each tile.
        by_depth = torch.argsort(depths.detach()[ids])
        ids, x0, y0, nx, n_tiles = (t[by_depth] for t in (ids, x0, y0, nx, n_tiles))
        total = int(n_tiles.sum())
        owner = torch.repeat_interleave(torch.arange(len(ids), device=device), n_tiles)  # [I]
        first = torch.cumsum(n_tiles, 0) - n_tiles
        local = torch.arange(total, device=device) - first[owner]
        tile_id = (y0[owner] + local // nx[owner]) * tw + x0[owner] + local % nx[owner]
        tile_id, order = torch.sort(tile_id, stable=True)
        isect = ids[owner[order]]  # [I] splat ids, grouped by tile, front to back
        counts = torch.bincount(tile_id, minlength=tw * th)
        starts = torch.cumsum(counts, 0) - counts
        busy = torch.nonzero(counts)[:, 0]
        # Pixel centres (gsplat samples at +0.5) relative to the tile corner, and the quadratic
        # basis that turns the per-splat Gaussian exponent into one matmul per chunk.
        pix = torch.arange(CPU_TILE, device=device, dtype=means2d.dtype) + 0.5
        v, u = torch.meshgrid(pix, pix, indexing="ij")
        u, v = u.reshape(-1), v.reshape(-1)
        basis = torch.stack([u * u, v * v, u * v, u, v, torch.ones_like(u)], -1)  # [P, 6]

    log_opac = torch.log(opac)
    D = colors.shape[-1]
    feats = torch.cat([colors, depths[:, None], torch.ones_like(depths)[:, None]], -1)  # [N, D+2]
    acc = means2d.new_zeros(tw * th, P, D + 2)  # Σ w·(r, g, b, z, 1) per pixel
    elements = _GROUP_ELEMENTS_CUDA if device.type == "cuda" else _GROUP_ELEMENTS
    group = max(1, elements // (P * _CHUNK))
    # A pixel stops once its transmittance falls to T_MIN (gsplat); with `cross_level`, once it
    # has crossed the level: what lies behind no longer changes its crossing or whether its alpha
    # reaches the level, and flat surfels seldom take T to T_MIN within the front surface, so
    # without this every tile composited its whole list, back faces included (fusion's 24 draft
    # views of a 60k-surfel crate: 15–25 % less time).
    stop_T = T_MIN if cross_level is None else max(T_MIN, 1.0 - cross_level)
    if cross_level is not None:
        cross_gid = torch.full((tw * th, P), -1, dtype=torch.long, device=device)
        cross_alpha = means2d.new_zeros(tw * th, P)
        cross_before = means2d.new_ones(tw * th, P)
    for gi in range(0, len(busy), group):
        tiles = busy[gi : gi + group]
        n_left = counts[tiles]
        tile_acc = means2d.new_zeros(len(tiles), P, D + 2)
        done = torch.zeros(len(tiles), P, dtype=torch.bool, device=device)
        act = torch.arange(len(tiles), device=device)  # tiles of this group still compositing
        k0 = 0
        while len(act):
            t = tiles[act]
            # Few tiles left (long lists at silhouettes): take longer chunks, fewer passes.
            L = max(_CHUNK, min(elements // (len(act) * P), int(n_left[act].max()) - k0))
            with torch.no_grad():
                k = k0 + torch.arange(L, device=device)
                slot_ok = k[None] < n_left[act][:, None]  # [A, L]
                gid = isect[(starts[t][:, None] + k[None]).clamp_max(len(isect) - 1)]  # [A, L]
                ox = ((t % tw) * CPU_TILE).to(means2d.dtype)[:, None]
                oy = ((t // tw) * CPU_TILE).to(means2d.dtype)[:, None]
            mx, my = means2d[gid, 0] - ox, means2d[gid, 1] - oy  # [A, L] tile-relative
            ca, cb, cc = conics[gid].unbind(-1)
            # log α = log o − σ with σ = ½a·dx² + ½c·dy² + b·dx·dy written in (u, v) monomials.
            const = log_opac[gid] - (0.5 * ca * mx * mx + 0.5 * cc * my * my + cb * mx * my)
            coef = torch.stack(
                [-0.5 * ca, -0.5 * cc, -cb, ca * mx + cb * my, cc * my + cb * mx,
                 torch.where(slot_ok, const, -1e4)], 1
            )  # [A, 6, L]
            alpha = torch.exp(torch.matmul(basis, coef)).clamp_max(ALPHA_MAX)  # [A, P, L]
            alpha = torch.where(alpha >= ALPHA_MIN, alpha, 0.0)
            T0 = 1.0 - tile_acc[act][..., D + 1 :]  # [A, P, 1] transmittance before this chunk
            trans = torch.cumprod(1.0 - alpha, dim=-1) * T0  # after each splat
            # gsplat stops a pixel *before* the splat that would take T to ≤ 1e-4; T only falls,
            # so the kept splats are a prefix and T before each is the shifted product.
            keep = (trans > T_MIN) & ~done[act][..., None]
            before = torch.cat([T0, trans[..., :-1]], -1)
            w = torch.where(keep, alpha * before, 0.0)
            tile_acc = tile_acc.index_add(0, act, torch.bmm(w, feats[gid]))
            if cross_level is not None:
                with torch.no_grad():
                    # T only falls, so at most one splat per pixel takes it past 1 − level.
                    crosses = (before > 1.0 - cross_level) & (trans <= 1.0 - cross_level) & keep
                    found = crosses.any(-1)  # [A, P]
                    k = crosses.float().argmax(-1, keepdim=True)  # [A, P, 1]
                    rows = t[:, None].expand_as(found)[found]
                    cols = torch.nonzero(found, as_tuple=True)[1]
                    cross_gid[rows, cols] = torch.gather(gid, 1, k[..., 0])[found]
                    cross_alpha[rows, cols] = alpha.gather(-1, k)[..., 0][found]
                    cross_before[rows, cols] = before.gather(-1, k)[..., 0][found]
            with torch.no_grad():
                done[act] |= trans[..., -1] <= stop_T
                k0 += L
                still = (n_left[act] > k0) & ~done[act].all(-1)
                act = act[still]
        acc = acc.index_copy(0, tiles, tile_acc)

    def to_image(x: Tensor) -> Tensor:  # [th*tw, P, D] → [H, W, D]
        d = x.shape[-1]
        img = x.reshape(th, tw, CPU_TILE, CPU_TILE, d).permute(0, 2, 1, 3, 4)
        img = img.reshape(th * CPU_TILE, tw * CPU_TILE, d)
        return img[:height, :width]

    img = to_image(acc)
    alpha_img = img[..., D + 1 :]
    rgb_img = img[..., :D] + (1.0 - alpha_img) * background
    depth_img = img[..., D : D + 1] / alpha_img.clamp_min(1e-10)
    if cross_level is None:
        return rgb_img, alpha_img, depth_img
    cross = (to_image(x[..., None])[..., 0] for x in (cross_gid, cross_alpha, cross_before))
    return rgb_img, alpha_img, depth_img, tuple(cross)


@torch.no_grad()
def render_depth(g: Gaussians, cams: Cameras, level: float) -> tuple[Tensor, Tensor]:
    """Accumulated alpha [C, H, W, 1] (exact below `level`; at least `level` where the ray gets
    there, compositing stopping soon after) and the camera z [C, H, W, 1] at which each pixel's
    ray has accumulated `level` of alpha (0 where it never does): the splat's visible surface.

    Each Gaussian's opacity along a ray rises as o·exp(−(s − s*)²/2σ²) up to its peak at s*
    (Gaussian Opacity Fields' ray–Gaussian model, arXiv:2404.10772), so the ray crosses `level`
    inside the ramp of the splat that makes it cross, up to ≈1.2σ in front of that splat's peak.
    A blobby splat (SDS, a short photometric fit) sits about its radius inside the surface its
    silhouettes show: the centre depths that an expected-depth render averages put the surface
    a splat-width inside and mix the layers behind it in; for flat surfels σ → 0 and it is the
    surfel's plane along the ray (no slant error). gsplat has no such output, so this is the
    twin's compositing on whatever device the splat is on, all views at once (stacked into one
    tall image: one pass of kernels instead of one per view on a GPU).
    """
    opac = torch.sigmoid(g.opacities)
    means2d, conics, depths, radii = project(g, cams, opac)  # [C, N, ...]
    C, N = depths.shape
    dev = g.means.device
    th = -(-cams.height // CPU_TILE)
    rows = torch.arange(C, device=dev)[:, None].expand(C, N) * th  # [C, N] first tile row of each view
    offset = torch.zeros(C, 1, 2, device=dev)
    offset[:, 0, 1] = torch.arange(C, device=dev) * (th * CPU_TILE)
    _, alpha, _, cross = rasterize_view(
        (means2d + offset).reshape(-1, 2), conics.reshape(-1, 3), torch.zeros(C * N, 0, device=dev),
        opac.repeat(C), depths.reshape(-1), radii.reshape(-1, 2), torch.zeros(0, device=dev),
        cams.width, C * th * CPU_TILE, cross_level=level,
        tile_rows=torch.stack([rows, rows + th], -1).reshape(-1, 2),
    )

    def per_view(x: Tensor) -> Tensor:  # [C·th·T, W, ...] → [C, H, W, ...]
        return x.reshape(C, th * CPU_TILE, *x.shape[1:])[:, : cams.height]

    gid, a_cross, before = (per_view(x) for x in cross)
    z = crossing_depth(g, cams, level, gid, a_cross, before, N)
    return per_view(alpha), z[..., None]


def crossing_depth(g: Gaussians, cams: Cameras, level: float, gid: Tensor, alpha: Tensor,
                   before: Tensor, n: int) -> Tensor:  # [C, H, W] ×3 → [C, H, W]
    """Camera z where each pixel's ray crosses `level`, given the splat `gid` (an index into the
    views' stacked splats, `n` per view) that makes it cross, that splat's alpha at the pixel and
    the transmittance before it (see `render_depth`)."""
    out = torch.zeros(gid.shape, device=gid.device)
    hit = gid >= 0
    if not hit.any():
        return out
    c, v, u = torch.nonzero(hit, as_tuple=True)
    ids = gid[hit] % n
    K = cams.Ks[c]  # [M, 3, 3]
    R, t = cams.viewmats[c, :3, :3], cams.viewmats[c, :3, 3]  # [M, 3, 3], [M, 3]
    d = torch.stack([(u + 0.5 - K[:, 0, 2]) / K[:, 0, 0], (v + 0.5 - K[:, 1, 2]) / K[:, 1, 1],
                     torch.ones_like(u, dtype=torch.float32)], -1)  # [M, 3] ray directions, z = 1
    # The ray s·d (s = camera z) in each splat's own axes, where its inverse covariance is diagonal.
    axes = R @ quat_to_rotmat(g.quats[ids])  # [M, 3, 3] columns: splat axes in camera frame
    inv_s = torch.exp(-g.scales[ids].float())  # [M, 3]
    dl = (d[:, None, :] @ axes)[:, 0] * inv_s  # [M, 3]
    mc = (R @ g.means[ids].float()[:, :, None])[:, :, 0] + t  # [M, 3] centres, camera frame
    ml = (mc[:, None, :] @ axes)[:, 0] * inv_s
    aa = (dl * dl).sum(-1).clamp_min(1e-12)
    peak = (dl * ml).sum(-1) / aa  # s* [M]
    sigma = aa.rsqrt()
    need = 1.0 - (1.0 - level) / before[hit].clamp_min(1e-6)
    ramp = torch.sqrt(2.0 * torch.log((alpha[hit] / need.clamp_min(1e-6)).clamp_min(1.0)))
    out[hit] = (peak - sigma * ramp).clamp_min(NEAR_PLANE)
    return out
