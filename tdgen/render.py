"""Cameras and Gaussian rendering: gsplat on CUDA, a pure-PyTorch twin of the same maths on CPU.

Conventions (docs/DESIGN.md): OpenCV view matrices (world→camera, x right, y down, z forward),
+Y up world, orbit azimuth 0 = camera on +Z (the front), degrees at the API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tdgen.config import Stage1Config
from tdgen.gaussians import C0, Gaussians

Backend = Literal["auto", "gsplat", "torch"]

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
TILE = 16
"""Tile edge in pixels for gsplat's CUDA rasterizer (its default)."""
CPU_TILE = 8
"""Tile edge for the CPU twin: dense per-tile work wastes less on small splats with 8×8 tiles
(0.45 vs 0.8 CPU-s per 256² view at 60k splats); the image is the same either way."""


@dataclass(frozen=True)
class Cameras:
    viewmats: Tensor  # [C, 4, 4] OpenCV world→camera
    Ks: Tensor  # [C, 3, 3] pinhole intrinsics, pixels
    width: int
    height: int
    elevation: Tensor  # [C] degrees
    azimuth: Tensor  # [C] degrees

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @property
    def positions(self) -> Tensor:  # [C, 3] camera centres in world space
        R, t = self.viewmats[:, :3, :3], self.viewmats[:, :3, 3]
        return -(R.transpose(1, 2) @ t[:, :, None])[:, :, 0]

    def to(self, device) -> Cameras:
        return Cameras(self.viewmats.to(device), self.Ks.to(device), self.width, self.height,
                       self.elevation.to(device), self.azimuth.to(device))

    def index(self, sel) -> Cameras:
        return Cameras(self.viewmats[sel], self.Ks[sel], self.width, self.height,
                       self.elevation[sel], self.azimuth[sel])


@dataclass
class RenderOutput:
    rgb: Tensor  # [C, H, W, 3] in [0, 1] (SH colours clamp ≥ 0 only, like gsplat)
    alpha: Tensor  # [C, H, W, 1]
    info: dict  # means2d [C,N,2] (grad retained by strategies), radii [C,N,2] int, width, height,
    #             n_cameras, gaussian_ids (None: unpacked)
    depth: Tensor | None = None  # [C, H, W, 1] expected camera z (Σ w·z / Σ w), 0 where empty


# ---------------------------------------------------------------------------------------------
# Cameras


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> Tensor:
    """OpenCV world→camera matrix for a camera at `eye` looking at `target`. [3] → [4, 4].

    Batched eyes/targets/ups ([C, 3]) give [C, 4, 4]. When the view direction is parallel to `up`
    (straight down or up), the image "up" falls back to −Z looking down and +Z looking up, the
    limit of an az = 0 orbit.
    """
    eye_t = torch.as_tensor(eye, dtype=torch.float32)
    device = eye_t.device
    target_t = torch.as_tensor(target, dtype=torch.float32, device=device)
    up_t = torch.as_tensor(up, dtype=torch.float32, device=device)
    single = eye_t.dim() == 1
    eye_t, target_t, up_t = torch.broadcast_tensors(eye_t.reshape(-1, 3), target_t.reshape(-1, 3),
                                                    up_t.reshape(-1, 3))
    fwd = torch.nn.functional.normalize(target_t - eye_t, dim=-1)  # camera +z
    right = torch.linalg.cross(fwd, up_t)
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        z = torch.zeros_like(fwd)
        z[:, 2] = fwd[:, 1]
        right = torch.where(degenerate[:, None], torch.linalg.cross(fwd, z), right)
    right = torch.nn.functional.normalize(right, dim=-1)  # camera +x
    down = torch.linalg.cross(fwd, right)  # camera +y
    R = torch.stack([right, down, fwd], dim=1)  # [C, 3, 3] rows = camera axes in world
    out = torch.eye(4, device=device).repeat(len(R), 1, 1)
    out[:, :3, :3] = R
    out[:, :3, 3] = -(R @ eye_t[:, :, None])[:, :, 0]
    return out[0] if single else out


def orbit_cameras(elevation, azimuth, radius: float, fovy: float, width: int, height: int,
                  device=None) -> Cameras:
    """Cameras on a sphere of `radius` looking at the origin (degrees; az 0 = front, +Z)."""
    el = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1)
    az = torch.as_tensor(azimuth, dtype=torch.float32, device=device).reshape(-1)
    el, az = torch.broadcast_tensors(el, az)
    device = el.device
    el_r, az_r = torch.deg2rad(el), torch.deg2rad(az)
    eye = radius * torch.stack(
        [torch.cos(el_r) * torch.sin(az_r), torch.sin(el_r), torch.cos(el_r) * torch.cos(az_r)], -1
    )  # [C, 3]
    # At the poles the world up is parallel to the view; use the orbit's own "away" direction,
    # so a top view at azimuth az keeps that azimuth's front at the bottom of the image.
    horiz = torch.stack([torch.sin(az_r), torch.zeros_like(az_r), torch.cos(az_r)], -1)
    pole = (el.abs() > 89.9)[:, None]
    world_up = torch.tensor([0.0, 1.0, 0.0], device=device)
    up = torch.where(pole, -torch.sign(el)[:, None] * horiz, world_up)
    viewmats = look_at(eye, torch.zeros_like(eye), up)
    if viewmats.dim() == 2:
        viewmats = viewmats[None]
    focal = 0.5 * height / math.tan(math.radians(fovy) / 2)
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]],
                     device=device)
    return Cameras(viewmats, K.repeat(len(el), 1, 1), int(width), int(height), el, az)


def sample_orbit_cameras(n: int, cfg: Stage1Config, resolution: int,
                         generator: torch.Generator) -> Cameras:
    """`n` random training views: elevation uniform in [elevation_min, elevation_max], azimuth
    uniform in [−180, 180), at `cfg.camera_radius` with `cfg.fovy`, square `resolution`."""
    device = generator.device
    u = torch.rand(2, n, generator=generator, device=device)
    el = cfg.elevation_min + (cfg.elevation_max - cfg.elevation_min) * u[0]
    az = -180.0 + 360.0 * u[1]
    return orbit_cameras(el, az, cfg.camera_radius, cfg.fovy, resolution, resolution, device)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_gaussians(g: Gaussians, cams: Cameras, backgrounds: Tensor | None,  # [C, 3]
                     backend: Backend = "auto") -> RenderOutput:
    """Render `g` from every camera: gsplat's CUDA rasterizer, or the pure-PyTorch twin on CPU.

    Differentiable w.r.t. every Gaussian parameter; `info` is what gsplat's strategies read.
    """
    if backend == "auto":
        backend = "gsplat" if g.means.is_cuda else "torch"
    if backgrounds is None:
        backgrounds = torch.zeros(len(cams), 3, device=g.means.device)
    if backend == "gsplat":
        return _render_gsplat(g, cams, backgrounds)
    elif backend == "torch":
        return _render_torch(g, cams, backgrounds)
    raise ValueError(f"unknown render backend {backend!r}; use auto, gsplat or torch")


def _render_gsplat(g: Gaussians, cams: Cameras, backgrounds: Tensor) -> RenderOutput:
    from gsplat import rasterization

    colors, alphas, info = rasterization(
        means=g.means,
        quats=g.quats,
        scales=torch.exp(g.scales),
        opacities=torch.sigmoid(g.opacities),
        colors=g.colors(),  # [N, K+1, 3] SH coefficients
        viewmats=cams.viewmats,
        Ks=cams.Ks,
        width=cams.width,
        height=cams.height,
        near_plane=NEAR_PLANE,
        eps2d=EPS2D,
        sh_degree=g.sh_degree,
        packed=False,  # info["means2d"] is then [C, N, 2], the same as the CPU twin
        tile_size=TILE,
        backgrounds=backgrounds,
        render_mode="RGB+ED",
    )
    return RenderOutput(rgb=colors[..., :3], alpha=alphas, info=info, depth=colors[..., 3:4])


def _project(g: Gaussians, cams: Cameras, opac: Tensor):
    """EWA splatting projection, the maths of gsplat's fused 3DGS projection kernel.

    Returns means2d [C,N,2], conics [C,N,3] (a, b, c of Σ2d⁻¹), depths [C,N], radii [C,N,2] int.
    Written with batched matmuls rather than gsplat's `_torch_impl` einsums, which are ~10×
    slower on CPU at 60k splats.
    """
    from tdgen.gaussians import quat_to_rotmat

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


def _colors(g: Gaussians, cams: Cameras) -> Tensor:  # [C, N, 3] view-dependent RGB, ≥ 0
    C = len(cams)
    if g.sh_degree == 0:
        rgb = (C0 * g.sh0 + 0.5).clamp_min(0.0)
        return rgb[None].expand(C, -1, -1)
    from gsplat.cuda._torch_impl import _spherical_harmonics  # pure torch, no CUDA

    dirs = g.means[None] - cams.positions[:, None]  # [C, N, 3]
    coeffs = g.colors()[None].expand(C, -1, -1, -1)  # [C, N, K+1, 3]
    return (_spherical_harmonics(g.sh_degree, dirs, coeffs) + 0.5).clamp_min(0.0)


def _render_torch(g: Gaussians, cams: Cameras, backgrounds: Tensor) -> RenderOutput:
    # gsplat's own compositing has no CPU path, so this re-implements its tile rasterizer with
    # dense tensor ops per group of tiles; autograd gives the backward.
    opac = torch.sigmoid(g.opacities)  # [N]
    means2d, conics, depths, radii = _project(g, cams, opac)
    colors = _colors(g, cams)
    rgbs, alphas, zs = [], [], []
    for c in range(len(cams)):
        rgb, alpha, depth = _rasterize_view(
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
    return RenderOutput(torch.stack(rgbs), torch.stack(alphas), info, torch.stack(zs))


# Work per chunk, in elements of the [tiles, pixels, splats] tensors: larger is faster until
# memory bandwidth wins; 2²² keeps each intermediate at 16 MB.
_GROUP_ELEMENTS = 1 << 22
_CHUNK = 128
"""Splats composited per tile per pass (at least); a tile leaves once all its pixels are opaque."""


def _rasterize_view(means2d, conics, colors, opac, depths, radii, background, width, height):
    """Front-to-back alpha compositing of one view, tile by tile (gsplat's classic 3DGS kernel).

    means2d [N,2], conics [N,3], colors [N,3], opac [N], depths [N], radii [N,2] int,
    background [3] → rgb [H,W,3], alpha [H,W,1], depth [H,W,1].
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
    feats = torch.cat([colors, depths[:, None], torch.ones_like(depths)[:, None]], -1)  # [N, 5]
    acc = means2d.new_zeros(tw * th, P, 5)  # Σ w·(r, g, b, z, 1) per pixel
    group = max(1, _GROUP_ELEMENTS // (P * _CHUNK))
    for gi in range(0, len(busy), group):
        tiles = busy[gi : gi + group]
        n_left = counts[tiles]
        tile_acc = means2d.new_zeros(len(tiles), P, 5)
        done = torch.zeros(len(tiles), P, dtype=torch.bool, device=device)
        act = torch.arange(len(tiles), device=device)  # tiles of this group still compositing
        k0 = 0
        while len(act):
            t = tiles[act]
            # Few tiles left (long lists at silhouettes): take longer chunks, fewer passes.
            L = max(_CHUNK, min(_GROUP_ELEMENTS // (len(act) * P), int(n_left[act].max()) - k0))
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
            T0 = 1.0 - tile_acc[act][..., 4:5]  # [A, P, 1] transmittance before this chunk
            trans = torch.cumprod(1.0 - alpha, dim=-1) * T0  # after each splat
            # gsplat stops a pixel *before* the splat that would take T to ≤ 1e-4; T only falls,
            # so the kept splats are a prefix and T before each is the shifted product.
            keep = (trans > T_MIN) & ~done[act][..., None]
            before = torch.cat([T0, trans[..., :-1]], -1)
            w = torch.where(keep, alpha * before, 0.0)
            tile_acc = tile_acc.index_add(0, act, torch.bmm(w, feats[gid]))
            with torch.no_grad():
                done[act] |= trans[..., -1] <= T_MIN
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
    alpha_img = img[..., 4:5]
    rgb_img = img[..., :3] + (1.0 - alpha_img) * background
    depth_img = img[..., 3:4] / alpha_img.clamp_min(1e-10)
    return rgb_img, alpha_img, depth_img
