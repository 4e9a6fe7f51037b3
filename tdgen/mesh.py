"""Stage 2a: splat → volume → marching cubes → cleaned, decimated, closed triangle mesh.

Two volumes, chosen by `MeshConfig.method`:
- `fusion` (`fusion.py`, the default): the splat's visible surface from depth rendered all around
  it, fused into a signed distance; closed by construction. Right for flat surfels (trained and
  captured 3DGS), which the density iso-surface shreds, and, with a lower alpha level and a blur
  as wide as the blobs, for blobby splats (SDS, short photometric fits).
- `density` (`density.py`): DreamGaussian's Gaussian-density iso-surface, kept for comparison.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tdgen.config import MeshConfig
from tdgen.errors import GenerationError
from tdgen.gaussians import Gaussians
from tdgen.meshdata import Mesh
from tdgen.progress import Progress, ProgressFn, no_progress


def _inliers(means: Tensor, keep: Tensor) -> Tensor:  # [N, 3], [N] bool → [N] bool
    """Drop far floaters (stray splats of a captured scene, or of a diverged run): keep centres
    within a quarter of the bulk's extent around its 1–99 % range on every axis. A few stray
    splats would otherwise set the lattice size and leave the object a few voxels wide."""
    pts = means[keep]
    if len(pts) < 20:
        return keep
    q = torch.quantile(pts[:: max(1, len(pts) // 200_000)].float(),
                       torch.tensor([0.01, 0.99], device=means.device), dim=0)  # [2, 3]
    margin = 0.25 * (q[1] - q[0]).max()
    return ((means >= q[0] - margin) & (means <= q[1] + margin)).all(-1)


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


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int,
             min_component: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation to at most about `target` triangles (no-op when already below),
    then the collapse's debris removed (see `_drop_flaps`)."""
    import fast_simplification

    if len(faces) <= target:
        return vertices, faces
    best = None
    # The collapses occasionally pinch two sheets onto one edge (an edge of four faces): no longer
    # watertight. A slightly different budget collapses other edges; take the first clean result.
    for shrink in (1.0, 0.98, 0.96, 0.94):
        v, f = fast_simplification.simplify(
            vertices.astype(np.float64), faces.astype(np.int64), target_count=int(target * shrink)
        )
        v, f = _drop_flaps(v.astype(np.float32), f.astype(np.int64), min_component)
        best = best or (v, f)
        if _manifold_edges(v, f):
            return v, f
    # Thin, ragged parts (a slab one fused voxel thick in places) pinch at every budget; cut the
    # pinches out and cap the holes instead.
    return _unpinch(*best)


def _weld(v: np.ndarray) -> np.ndarray:  # [V, 3] → [V]
    """One id per distinct position (the decimator can leave two vertices on one spot)."""
    return np.unique(v, axis=0, return_inverse=True)[1].reshape(-1)


def _bad_edge_vertices(g: np.ndarray) -> np.ndarray:  # [F, 3] welded ids → [K]
    """Vertices on an edge not shared by exactly two faces."""
    e = np.sort(np.concatenate([g[:, [0, 1]], g[:, [1, 2]], g[:, [2, 0]]]), axis=1)
    u, counts = np.unique(e, axis=0, return_counts=True)
    return np.unique(u[counts != 2])


def _unpinch(v: np.ndarray, f: np.ndarray, max_rounds: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Remove the faces around every non-manifold edge and cap each hole with a fan about its
    centroid; `v` [V, 3], `f` [F, 3] → the same, closed where it can be.

    fast-simplification (the only well-kept MIT quadric decimator here) has no link-condition
    check, so a collapse can press two sheets of a thin part onto one edge (four faces). The cap
    keeps the orientation: a hole's boundary edge u→v gets the face (v, u, centroid). Where a hole
    touches itself or another at a vertex (four boundary edges there), the faces round that vertex
    go too, until every hole's boundary is a simple loop."""
    import scipy.sparse as sp

    weld = _weld(v)
    g_all = weld[f]  # [F, 3] welded ids
    bad = _bad_edge_vertices(g_all)
    if len(bad) == 0:
        return v, f
    n = len(v)
    drop = np.isin(g_all, bad).any(1)
    for _ in range(max_rounds):
        g = g_all[~drop]
        directed = np.concatenate([g[:, [0, 1]], g[:, [1, 2]], g[:, [2, 0]]])  # [3F, 2]
        edges, inv, counts = np.unique(np.sort(directed, axis=1), axis=0, return_inverse=True,
                                       return_counts=True)
        boundary = directed[counts[inv.reshape(-1)] == 1]  # u → v round the holes
        deg = np.bincount(boundary.reshape(-1), minlength=n)
        # vertices where holes touch, and any edge still of more than two faces
        touching = np.union1d(np.flatnonzero(deg > 2), edges[counts > 2])
        if len(touching) == 0:
            break
        drop |= np.isin(g_all, touching).any(1)
    else:
        return v, f
    adj = sp.coo_matrix((np.ones(len(boundary)), (boundary[:, 0], boundary[:, 1])), shape=(n, n))
    _, label = sp.csgraph.connected_components(adj, directed=False)
    holes, hole_of = np.unique(label[boundary[:, 0]], return_inverse=True)
    # Work on welded ids; map each back to one original vertex at that position.
    rep = np.zeros(n, np.int64)
    rep[weld[::-1]] = np.arange(len(v))[::-1]
    centres = np.zeros((len(holes), 3), np.float64)
    np.add.at(centres, hole_of, v[rep[boundary[:, 0]]].astype(np.float64))
    centres /= np.bincount(hole_of)[:, None]
    caps = np.stack([rep[boundary[:, 1]], rep[boundary[:, 0]], len(v) + hole_of], 1)
    out_v = np.concatenate([v, centres.astype(v.dtype)])
    out_f = np.concatenate([rep[g], caps])
    used = np.unique(out_f)
    remap = np.full(len(out_v), -1, np.int64)
    remap[used] = np.arange(len(used))
    out_v, out_f = out_v[used], remap[out_f]
    return (out_v, out_f) if _manifold_edges(out_v, out_f) else (v, f)


def _manifold_edges(v: np.ndarray, f: np.ndarray) -> bool:
    """Every edge is shared by exactly two faces once vertices at one position are merged (the
    decimator can leave two vertices on one spot), so a closed input stays closed."""
    return len(_bad_edge_vertices(_weld(v)[f])) == 0


def _drop_flaps(v: np.ndarray, f: np.ndarray, min_component: float) -> tuple[np.ndarray, np.ndarray]:
    """Edge collapses leave a few two-sided "flaps" (a triangle and its reverse on the same three
    vertices, zero volume, a separate piece) and collapsed triangles; both break watertightness
    and add pieces to a connected object, so every copy of a doubled face goes, then degenerate
    faces, then pieces below `min_component` of the largest."""
    import trimesh

    key = np.sort(f, axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    keep = (counts[inv.reshape(-1)] == 1) & (key[:, 0] != key[:, 1]) & (key[:, 1] != key[:, 2])
    f = f[keep]
    if len(f) and min_component > 0:
        adj = trimesh.graph.face_adjacency(f)
        labels = trimesh.graph.connected_component_labels(adj, node_count=len(f))
        sizes = np.bincount(labels)
        f = f[sizes[labels] >= min_component * sizes.max()]
    used = np.unique(f)
    remap = np.full(len(v), -1, np.int64)
    remap[used] = np.arange(len(used))
    return v[used], remap[f]


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


FLAT_RATIO = 0.1
"""A splat whose median opaque Gaussian's shortest axis is at most this fraction of its longest is
flat (trained and captured 3DGS surfels, case A's discs): fusion reads its depth at `mesh.alpha`."""

BLOB_RATIO = 0.2
"""At or above this median ratio a splat is blobby (SDS: ≈ 0.6; photometric fits from the sphere
init: 0.24–0.25) and read at `mesh.blob_alpha`; between the two ratios the level moves linearly,
so two nearly alike splats never get levels far apart. The fits' surfaces lie 3–5 mm inside the
reference read at 0.5 and on it read at 0.3 (CPU case B: `benchmarks/results/caseb-2026-12-07/`,
`stage2-level-smooth-2026-12-07/`)."""


def _blobbiness(g: Gaussians) -> float:
    """0 for a flat splat (median shortest/longest axis ≤ `FLAT_RATIO`), 1 for a blobby one
    (≥ `BLOB_RATIO`), linear between."""
    s = torch.exp(g.scales[g.bulk()].float())  # [M, 3]
    ratio = float((s.amin(-1) / s.amax(-1).clamp_min(1e-20)).median())
    return min(max((ratio - FLAT_RATIO) / (BLOB_RATIO - FLAT_RATIO), 0.0), 1.0)


def _alpha_level(t: float, cfg: MeshConfig) -> tuple[str, float]:
    """The accumulated alpha fusion reads depth at for blobbiness `t`, and the setting that
    mostly decides it."""
    return ("alpha" if t < 0.5 else "blob_alpha"), cfg.alpha + t * (cfg.blob_alpha - cfg.alpha)


def _smoothing_passes(t: float, cfg: MeshConfig) -> int:
    """Taubin passes for blobbiness `t`: `mesh.smooth` for blobby splats, none for flat ones.
    The lumps are a blobby splat's (its visible surface is as bumpy as its blobs are thick);
    flat surfels fuse flat already, and the passes only round their slabs' edges (60k-surfel
    chair, H100 splat re-meshed on the CPU: held-out PSNR 25.02 dB → 24.38 with 30 passes)."""
    return int(round(t * cfg.smooth))


def extract_mesh(
    g: Gaussians, cfg: MeshConfig, device, on_progress: ProgressFn = no_progress
) -> Mesh:
    """Closed triangle mesh of the splat's surface (`cfg.method`), cleaned and decimated.

    Faces are CCW seen from outside, normals area-weighted after decimation; no UVs yet.
    """
    import mcubes

    device = torch.device(device)
    with torch.no_grad():
        g = g.to(device)
        alphas = g.alpha()  # [N]
        covs = g.covariances()  # [N, 3, 3]
        finite = torch.isfinite(g.means).all(-1) & torch.isfinite(covs).flatten(1).all(-1)
        keep = (alphas >= cfg.min_opacity) & finite
        keep &= _inliers(g.means, keep)
        if int(keep.sum()) == 0:
            raise GenerationError(
                f"the splat has no Gaussian above mesh.min_opacity={cfg.min_opacity} "
                f"({g.num} in total); lower mesh.min_opacity or check the stage-1 result"
            )
        kept = g.subset(keep)
        method = "fusion" if cfg.method == "auto" else cfg.method
        on_progress(Progress("grid", 0, 1, message=f"surface by {method}"))
        if method == "fusion":
            from tdgen.fusion import fuse_depth

            blobby = _blobbiness(kept)
            key, alpha = _alpha_level(blobby, cfg)
            field, origin, voxel = fuse_depth(
                kept, cfg.grid, cfg.views, cfg.view_resolution, cfg.truncation,
                alpha, on_progress=on_progress,
            )
            field = field.cpu().numpy()
            origin = origin.cpu().numpy().astype(np.float64)
            level = 0.0
            if not (field > level).any():
                raise GenerationError(
                    f"no surface: no view sees the splat with alpha ≥ {alpha:.3g} (mesh.{key}="
                    f"{getattr(cfg, key)}); "
                    f"lower mesh.{key} or check that the splat is not empty or transparent"
                )
            outside = -cfg.truncation
            passes = _smoothing_passes(blobby, cfg)
        else:
            from tdgen.density import density_field

            field, origin, voxel, level = density_field(
                g.means[keep], covs[keep], alphas[keep], cfg.grid, cfg.threshold, on_progress
            )
            outside = 0.0
            passes = cfg.smooth

    on_progress(Progress("mesh", 0, 4, message=f"marching cubes at {level:.3g}"))
    # An outside layer round the lattice: a surface touching the border still closes.
    field = np.pad(field, 1, constant_values=outside)
    verts, tris = mcubes.marching_cubes(field, level)
    verts = (verts - 1.0) * voxel + origin  # lattice index (x, y, z) → world
    # PyMCubes winds triangles CCW seen from the low side of the field, i.e. from outside
    # (glTF front faces); tests/test_mesh.py checks this on a sphere.
    tris = tris.astype(np.int64)

    on_progress(Progress("mesh", 1, 4, message="clean"))
    tm = _clean(verts, tris, cfg.min_component)
    if len(tm.faces) == 0:
        raise GenerationError(
            "marching cubes produced only degenerate triangles; raise mesh.grid or check the splat"
        )
    if passes > 0:
        import trimesh

        # Taubin (a shrink-free low-pass): fused depth leaves voxel-sized lumps on flat faces,
        # and a lump at the top or bottom sets the height the export scales to.
        trimesh.smoothing.filter_taubin(tm, lamb=0.5, nu=0.53, iterations=passes)
    on_progress(Progress("mesh", 2, 4, message=f"decimate {len(tm.faces)} → {cfg.triangles}"))
    v = np.asarray(tm.vertices, np.float32)
    v, f = decimate(v, np.asarray(tm.faces, np.int64), cfg.triangles, cfg.min_component)
    on_progress(Progress("mesh", 3, 4, message="normals"))
    mesh = Mesh(vertices=v.astype(np.float32), faces=f, normals=vertex_normals(v, f))
    on_progress(Progress("mesh", 4, 4, message=f"{mesh.num_faces} triangles"))
    return mesh
