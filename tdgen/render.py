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
from tdgen.gaussians import Gaussians
from tdgen.twin import ALPHA_MAX, ALPHA_MIN, CPU_TILE, EPS2D, NEAR_PLANE, T_MIN  # noqa: F401  (re-exported)

Backend = Literal["auto", "gsplat", "torch"]

TILE = 16
"""Tile edge in pixels for gsplat's CUDA rasterizer (its default)."""


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


def _render_torch(g: Gaussians, cams: Cameras, backgrounds: Tensor) -> RenderOutput:
    from tdgen import twin

    rgb, alpha, depth, info = twin.render_views(g, cams, backgrounds)
    return RenderOutput(rgb, alpha, info, depth)
