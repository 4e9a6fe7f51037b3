"""Collision shapes for game engines: one convex hull, or an approximate convex decomposition.

Engines collide against convex pieces (PhysX, Jolt, Godot Physics, Havok all take convex hulls of
at most 255 vertices), so a render mesh is not a collider. `hull` is the asset's convex hull
(trimesh / Qhull); `convex` is CoACD's approximate convex decomposition (Wei et al. 2022, MIT),
the well-kept library made for exactly this. The export writes each piece as a node named by
the engines' import conventions (`export.collision_names`).
"""

from __future__ import annotations

import numpy as np

from tdgen.config import ExportConfig
from tdgen.errors import GenerationError
from tdgen.meshdata import Mesh

DECOMPOSE_FACES = 1000
"""The surface is decimated to about this many triangles before CoACD: its cost grows with the
input, and a marching-cubes surface's voxel-scale bumps only add concavity that no collider
needs (measured on 5000-triangle draft meshes, 2 cores: 7–14 s → 2–3 s for the same hulls)."""

THRESHOLD = 0.1
"""CoACD's concavity threshold (its own unit, relative to the mesh size): 0.05 hit the 16-hull
cap on every test object; 0.1 gave 6–10 hulls whose volume is 1.0–1.25× the mesh's."""

MAX_HULL_VERTICES = 64
"""Vertices per hull at most (PhysX's limit is 255; fewer is cheaper at run time)."""


def collision_shapes(mesh: Mesh, cfg: ExportConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Convex pieces of `mesh` (closed, in any frame) for `cfg.collision`: a list of
    (vertices [V, 3] float32, faces [F, 3] int64), each a closed convex hull wound outward; []
    for `none`."""
    if cfg.collision == "none":
        return []
    if mesh.num_faces == 0:
        raise GenerationError("the mesh is empty, so it has no collision shape; "
                              "set export.collision=none or fix the mesh")
    if cfg.collision == "hull":
        parts = [np.asarray(mesh.vertices, np.float64)]
    else:
        parts = _decompose(mesh, cfg.collision_hulls)
    return [_hull(p) for p in parts if len(p) >= 4]


def _decompose(mesh: Mesh, max_hulls: int) -> list[np.ndarray]:
    try:
        import coacd
    except ImportError:
        raise GenerationError("export.collision=convex needs the coacd package; "
                              "pip install coacd, or use export.collision=hull") from None
    import fast_simplification

    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int64)
    if len(f) > DECOMPOSE_FACES:
        v, f = fast_simplification.simplify(v, f, target_count=DECOMPOSE_FACES)
    coacd.set_log_level("error")
    # preprocess "auto" remeshes only an input that is not manifold (decimation can pinch one).
    pieces = coacd.run_coacd(coacd.Mesh(v, f), threshold=THRESHOLD, max_convex_hull=int(max_hulls),
                             preprocess_mode="auto", decimate=True,
                             max_ch_vertex=MAX_HULL_VERTICES, seed=0)
    parts = [np.asarray(pv, np.float64) for pv, _ in pieces]
    return _merge_to(parts, max_hulls)


def _merge_to(parts: list[np.ndarray], max_hulls: int) -> list[np.ndarray]:
    """Merge pieces pairwise until at most `max_hulls` are left, each time the pair whose joint
    hull adds the least volume. CoACD caps the hulls of one connected part, not the count over
    disconnected parts (two separate posts stay two hulls even at max_convex_hull=1)."""
    import trimesh

    def vol(p: np.ndarray) -> float:
        try:
            return float(trimesh.convex.convex_hull(p).volume)
        except Exception:  # flat or degenerate: Qhull has no 3-D hull for it
            return 0.0

    vols = [vol(p) for p in parts]
    while len(parts) > max(1, max_hulls):
        best = None
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                joint = vol(np.concatenate([parts[i], parts[j]]))
                cost = joint - vols[i] - vols[j]
                if best is None or cost < best[0]:
                    best = (cost, i, j, joint)
        _, i, j, joint = best
        parts[i] = np.concatenate([parts[i], parts[j]])
        vols[i] = joint
        del parts[j], vols[j]
    return parts


def _hull(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The convex hull of `points` [N, 3], faces wound outward (Qhull via trimesh)."""
    import trimesh

    h = trimesh.convex.convex_hull(points)  # fixes winding and normals outward
    if len(h.vertices) > MAX_HULL_VERTICES:  # a plain hull of a dense mesh has hundreds
        h = trimesh.convex.convex_hull(h.vertices[_farthest(h.vertices, MAX_HULL_VERTICES)])
    return np.asarray(h.vertices, np.float32), np.asarray(h.faces, np.int64)


def _farthest(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of `k` of `points` [N, 3] chosen by farthest-point sampling (keeps the extremes,
    so the reduced hull still bounds nearly all of the shape)."""
    pick = [int(np.argmax(np.linalg.norm(points - points.mean(0), axis=1)))]
    d = np.linalg.norm(points - points[pick[0]], axis=1)
    for _ in range(k - 1):
        i = int(np.argmax(d))
        pick.append(i)
        d = np.minimum(d, np.linalg.norm(points - points[i], axis=1))
    return np.asarray(pick)
