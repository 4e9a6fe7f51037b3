"""Stage 2a: splat → density grid → marching cubes → cleaned, decimated triangle mesh.

The density is DreamGaussian's, d(x) = Σ_i α_i · exp(−½ (x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i)), unnormalised,
so the iso-level `MeshConfig.threshold = 1` means "about one opaque splat deep".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tdgen.config import MeshConfig
from tdgen.errors import GenerationError
from tdgen.gaussians import Gaussians
from tdgen.meshdata import Mesh
from tdgen.progress import Progress, ProgressFn, no_progress

_SIGMAS = 3.0
"""Each Gaussian is evaluated inside its ±3σ box (exp(−4.5) ≈ 1 % of its peak at the edge)."""

_PAD_VOXELS = 2
"""Empty voxels kept around the cloud's ±3σ box, so the iso-surface always closes."""

_PAIRS_PER_PASS = {"cuda": 1 << 24, "cpu": 1 << 20}
"""(Gaussian, voxel) pairs evaluated per batched pass: bounds the temporaries (~12 bytes a pair)."""


# ---------------------------------------------------------------------------------------------
# Density grid


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


def _inliers(means: Tensor, keep: Tensor) -> Tensor:  # [N, 3], [N] bool → [N] bool
    """Drop far floaters (stray splats of a captured scene, or of a diverged run): keep centres
    within a quarter of the bulk's extent around its 0.5–99.5 % range on every axis. One stray
    splat would otherwise set the lattice size and leave the object a few voxels wide."""
    pts = means[keep]
    if len(pts) < 20:
        return keep
    q = torch.quantile(pts[:: max(1, len(pts) // 200_000)].float(),
                       torch.tensor([0.005, 0.995], device=means.device), dim=0)  # [2, 3]
    margin = 0.25 * (q[1] - q[0]).max()
    return ((means >= q[0] - margin) & (means <= q[1] + margin)).all(-1)


def _fill_cavities(occupied: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Surface


def _clean(vertices: np.ndarray, faces: np.ndarray, min_component: float):
    import trimesh

    tm = trimesh.Trimesh(vertices, faces, process=True)  # merges duplicate vertices
    tm.update_faces(tm.nondegenerate_faces())
    tm.update_faces(tm.unique_faces())
    tm.remove_unreferenced_vertices()
    if len(tm.faces) == 0:
        return tm
    labels = trimesh.graph.connected_component_labels(tm.face_adjacency, node_count=len(tm.faces))
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_component * sizes.max()
    if not keep.all():
        tm.update_faces(keep)
        tm.remove_unreferenced_vertices()
    trimesh.repair.fix_winding(tm)
    return tm


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation to at most about `target` triangles (no-op when already below)."""
    import fast_simplification

    if len(faces) <= target:
        return vertices, faces
    v, f = fast_simplification.simplify(
        vertices.astype(np.float64), faces.astype(np.int64), target_count=int(target)
    )
    return v.astype(np.float32), f.astype(np.int64)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:  # [V,3], [F,3] → [V,3]
    """Area-weighted unit vertex normals; a vertex without faces gets +Y."""
    v = vertices.astype(np.float64)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])  # |fn| = 2·area
    n = np.zeros_like(v)
    for c in range(3):
        np.add.at(n, faces[:, c], fn)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 1e-20, n / np.maximum(length, 1e-20), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


def extract_mesh(
    g: Gaussians, cfg: MeshConfig, device, on_progress: ProgressFn = no_progress
) -> Mesh:
    """Triangle mesh of the splat's `cfg.threshold` iso-surface, cleaned and decimated.

    Faces are CCW seen from outside, normals area-weighted after decimation; no UVs yet.
    """
    import mcubes

    device = torch.device(device)
    with torch.no_grad():
        alphas = g.alpha().to(device)  # [N]
        covs = g.covariances().to(device)  # [N, 3, 3]
        means = g.means.to(device)  # [N, 3]
        finite = torch.isfinite(means).all(-1) & torch.isfinite(covs).flatten(1).all(-1)
        keep = (alphas >= cfg.min_opacity) & finite
        keep &= _inliers(means, keep)
        if int(keep.sum()) == 0:
            raise GenerationError(
                f"the splat has no Gaussian above mesh.min_opacity={cfg.min_opacity} "
                f"({g.num} in total); lower mesh.min_opacity or check the stage-1 result"
            )
        dens, origin, voxel = density_grid(
            means[keep], covs[keep], alphas[keep], cfg.grid, on_progress
        )
        dens = dens.cpu().numpy()
    origin = origin.cpu().numpy().astype(np.float64)

    threshold = float(cfg.threshold)
    peak = float(dens.max())
    if peak <= threshold and peak > MIN_PEAK_DENSITY:
        # A faint splat (few or translucent Gaussians after a short run) never reaches the absolute
        # iso-level; half its peak still traces its shape, and an asset beats an error here.
        threshold = 0.5 * peak
    on_progress(Progress("mesh", 0, 4, message=f"marching cubes at density {threshold:.3g}"))
    occupied = dens > threshold
    if not occupied.any():
        raise GenerationError(
            f"no surface: the splat density never reaches mesh.threshold={cfg.threshold} "
            f"(peak {peak:.3g}); lower mesh.threshold or check that the splat is not "
            "empty"
        )
    dens[_fill_cavities(occupied)] = 2.0 * threshold + peak
    # A zero layer round the lattice: density above the threshold at the border still closes.
    dens = np.pad(dens, 1)
    verts, tris = mcubes.marching_cubes(dens, threshold)
    verts = (verts - 1.0) * voxel + origin  # lattice index (x, y, z) → world
    # PyMCubes already winds triangles CCW seen from the low-density side, i.e. from outside
    # (glTF front faces); tests/test_mesh.py checks this on a sphere.
    tris = tris.astype(np.int64)

    on_progress(Progress("mesh", 1, 4, message="clean"))
    tm = _clean(verts, tris, cfg.min_component)
    if len(tm.faces) == 0:
        raise GenerationError(
            "marching cubes produced only degenerate triangles; raise mesh.grid or lower "
            "mesh.threshold"
        )
    on_progress(Progress("mesh", 2, 4, message=f"decimate {len(tm.faces)} → {cfg.triangles}"))
    v = np.asarray(tm.vertices, np.float32)
    v, f = decimate(v, np.asarray(tm.faces, np.int64), cfg.triangles)
    on_progress(Progress("mesh", 3, 4, message="normals"))
    mesh = Mesh(vertices=v.astype(np.float32), faces=f, normals=vertex_normals(v, f))
    on_progress(Progress("mesh", 4, 4, message=f"{mesh.num_faces} triangles"))
    return mesh
