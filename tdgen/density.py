"""Splat → density lattice, DreamGaussian's surface (`mesh.method = "density"`).

d(x) = Σ_i α_i · exp(−½ (x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i)), unnormalised, so the iso-level
`MeshConfig.threshold = 1` means "about one opaque splat deep". Right for the thick, blobby splats
of SDS; a Gaussian thinner than a voxel is seen by some voxel centres and missed by the next, so
flat surfels (trained or captured 3DGS) come out full of holes — `fusion.py` is the default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tdgen.progress import Progress, ProgressFn, no_progress

_SIGMAS = 3.0
"""Each Gaussian is evaluated inside its ±3σ box (exp(−4.5) ≈ 1 % of its peak at the edge)."""

_PAD_VOXELS = 2
"""Empty voxels kept around the cloud's ±3σ box, so the iso-surface always closes."""

_PAIRS_PER_PASS = {"cuda": 1 << 24, "cpu": 1 << 20}
"""(Gaussian, voxel) pairs evaluated per batched pass: bounds the temporaries (~12 bytes a pair)."""


CLOSE_VOXELS = 2
"""Pinholes up to about this many voxels wide in a hollow splat's shell are closed before the
cavity is filled (else marching cubes adds an inward-facing inner wall)."""

MIN_PEAK_DENSITY = 0.05
"""Below this peak density the splat is treated as empty rather than traced at half its peak."""


def _stencil_radius(r: Tensor) -> Tensor:
    """Round per-axis voxel radii up to a few sizes, so Gaussians share a handful of stencils.

    Exact up to 6 voxels (where most splats are); above, steps of ×1.4 waste < 2.7× work on the
    few large splats while keeping the number of stencil shapes (one batched pass each) small.
    """
    small = r <= 6
    big = 6.0 * torch.pow(1.4, torch.ceil(torch.log(r.clamp_min(6.0) / 6.0) / math.log(1.4)))
    return torch.where(small, r, torch.ceil(big)).long()


def density_grid(
    means: Tensor,  # [N, 3] world
    covs: Tensor,  # [N, 3, 3] world
    alphas: Tensor,  # [N] opacity in (0, 1)
    grid: int,
    on_progress: ProgressFn = no_progress,
) -> tuple[Tensor, Tensor, float]:
    """Splat every Gaussian into a cubic `grid`³ lattice over the cloud's ±3σ bounding box.

    Returns the density `[G, G, G]` indexed [x, y, z], the world position of voxel (0, 0, 0)
    `[3]` and the voxel edge length. Each Gaussian only visits the voxels of its own ±3σ box
    (never all voxels), in blocks that bound memory; everything runs on `means.device`.
    """
    device = means.device
    means = means.float()
    covs = covs.float()
    alphas = alphas.float()
    sigma = torch.sqrt(torch.diagonal(covs, dim1=-2, dim2=-1).clamp_min(1e-20))  # [N, 3]
    # A few huge splats (common in captured scenes) must not stretch the lattice: their 3σ reach
    # counts for the box only up to a tenth of the centres' extent.
    span = float((means.amax(0) - means.amin(0)).max().clamp_min(1e-6))
    reach = _SIGMAS * sigma.clamp_max(0.1 * span / _SIGMAS)
    lo = (means - reach).amin(0)
    hi = (means + reach).amax(0)
    centre = 0.5 * (lo + hi)
    extent = float((hi - lo).max().clamp_min(1e-6))
    # Cubic voxels: the longest side spans the lattice minus the padding on both ends.
    voxel = extent / (grid - 1 - 2 * _PAD_VOXELS)
    origin = centre - 0.5 * (grid - 1) * voxel  # [3] world position of voxel (0, 0, 0)

    # Σ⁻¹ in float64: thin splats have condition numbers ~1e6; a (voxel/100)² floor keeps a
    # collapsed (zero-scale) splat invertible without visibly changing any other. Measured in
    # voxel units, so the quadratic form below works on integer stencil offsets.
    eye = torch.eye(3, device=device, dtype=torch.float64)
    prec = torch.linalg.inv(covs.double() + (0.01 * voxel) ** 2 * eye)
    prec = (prec * voxel**2).float()  # [N, 3, 3]
    u = (means - origin) / voxel  # [N, 3] continuous voxel coordinates
    base = torch.round(u).long()  # [N, 3] nearest voxel
    frac = u - base  # [N, 3] in [-0.5, 0.5]
    # With d = o − f (o the integer offset from `base`), the exponent −½ dᵀPd + log α expands to
    # A·M(o): A [N, 10] per Gaussian, M [10, S] per stencil, so one small GEMM per block does all
    # pairs (far cheaper than elementwise broadcasting on CPU).
    pf = (prec @ frac[:, :, None])[..., 0]  # [N, 3]
    coef = torch.cat(
        [
            -0.5 * torch.stack([prec[:, 0, 0], prec[:, 1, 1], prec[:, 2, 2]], -1),
            -torch.stack([prec[:, 0, 1], prec[:, 0, 2], prec[:, 1, 2]], -1),
            pf,
            (-0.5 * (frac * pf).sum(-1) + torch.log(alphas.clamp_min(1e-12)))[:, None],
        ],
        dim=-1,
    )  # [N, 10]
    base_lin = (base[:, 0] * grid + base[:, 1]) * grid + base[:, 2]  # [N]

    # +0.5: the stencil is centred on the nearest voxel, up to half a voxel from the mean.
    radius = _stencil_radius(torch.ceil(_SIGMAS * sigma / voxel + 0.5)).clamp(max=grid)  # [N, 3]
    # The ±3σ box plus _PAD_VOXELS keeps exact stencils inside the lattice; rounded-up ones may
    # poke out and take the (slower) masked path.
    fits = ((base - radius) >= 0).all(-1) & ((base + radius) < grid).all(-1)  # [N]

    flat = torch.zeros(grid**3, device=device, dtype=torch.float32)
    budget = _PAIRS_PER_PASS["cuda" if device.type == "cuda" else "cpu"]

    keys, inverse = torch.unique(torch.cat([radius, fits[:, None].long()], -1), dim=0,
                                 return_inverse=True)
    order = torch.argsort(inverse)
    starts = np.concatenate([[0], np.cumsum(torch.bincount(inverse, minlength=len(keys)).tolist())])
    total = len(keys)
    for k, (rx, ry, rz, fit) in enumerate(keys.tolist()):
        ids = order[int(starts[k]) : int(starts[k + 1])]
        axes = [torch.arange(-r, r + 1, device=device) for r in (rx, ry, rz)]
        offs = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [S, 3]
        o = offs.float()
        ox, oy, oz = o.unbind(-1)
        monomials = torch.stack(
            [ox * ox, oy * oy, oz * oz, ox * oy, ox * oz, oy * oz, ox, oy, oz, torch.ones_like(ox)]
        )  # [10, S]
        off_lin = (offs[:, 0] * grid + offs[:, 1]) * grid + offs[:, 2]  # [S]
        # A splat bigger than the budget is walked through its stencil in slices.
        for s0 in range(0, len(offs), budget):
            mono = monomials[:, s0 : s0 + budget]
            step = max(1, budget // mono.shape[1])
            for b0 in range(0, len(ids), step):
                idx = ids[b0 : b0 + step]
                val = torch.exp(coef[idx] @ mono)  # [B, S]
                lin = base_lin[idx, None] + off_lin[None, s0 : s0 + budget]  # [B, S]
                if not fit:
                    vox = base[idx, None, :] + offs[None, s0 : s0 + budget]  # [B, S, 3]
                    inside = ((vox >= 0) & (vox < grid)).all(-1)
                    val, lin = val[inside], lin[inside]
                flat.index_add_(0, lin.reshape(-1), val.reshape(-1))
        msg = f"{len(ids)} splats, box {rx}×{ry}×{rz}"
        on_progress(Progress("grid", k + 1, total, message=msg))
    return flat.view(grid, grid, grid), origin, voxel


def fill_cavities(occupied: np.ndarray) -> np.ndarray:
    """Empty voxels that the outside cannot reach (a hollow splat's inside).

    SDS splats are mostly a shell; without this, marching cubes adds an inward-facing inner
    wall that doubles the triangle count, wastes texture space and is never seen.
    """
    from scipy.ndimage import binary_dilation, binary_fill_holes, generate_binary_structure

    # A thin shell has pinholes a voxel or two wide through which the inside "reaches" the
    # outside, and then nothing would be filled. Find the cavity inside the shell thickened by
    # r voxels (no pinholes left), then grow it back by r + 1 so it meets the shell and plugs
    # the pinholes, without reaching past the shell's outer side.
    r = CLOSE_VOXELS
    st = generate_binary_structure(3, 1)
    thick = binary_dilation(np.pad(occupied, r + 1), st, iterations=r)
    cavity = binary_fill_holes(thick) & ~thick
    cavity = binary_dilation(cavity, st, iterations=r + 1)[r + 1:-r - 1, r + 1:-r - 1, r + 1:-r - 1]
    return cavity & ~occupied


def density_field(
    means: Tensor,  # [N, 3] world
    covs: Tensor,  # [N, 3, 3] world
    alphas: Tensor,  # [N] opacity in (0, 1)
    grid: int,
    threshold: float,
    on_progress: ProgressFn = no_progress,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The density lattice ready for marching cubes: field [G, G, G] (cavities of hollow splats
    filled), origin [3], voxel edge, and the iso-level to trace (`threshold`, or half the peak of
    a faint splat that never reaches it). GenerationError when nothing reaches any level."""
    from tdgen.errors import GenerationError

    dens, origin, voxel = density_grid(means, covs, alphas, grid, on_progress)
    dens = dens.cpu().numpy()
    peak = float(dens.max())
    level = float(threshold)
    if peak <= level and peak > MIN_PEAK_DENSITY:
        # A faint splat (few or translucent Gaussians after a short run) never reaches the absolute
        # iso-level; half its peak still traces its shape, and an asset beats an error here.
        level = 0.5 * peak
    occupied = dens > level
    if not occupied.any():
        raise GenerationError(
            f"no surface: the splat density never reaches mesh.threshold={threshold} "
            f"(peak {peak:.3g}); lower mesh.threshold or check that the splat is not empty"
        )
    dens[fill_cavities(occupied)] = 2.0 * level + peak
    return dens, origin.cpu().numpy().astype(np.float64), voxel, level

