"""Stage 2b: UV atlas with xatlas (charts cut along seams, packed into one `size`² texture)."""

from __future__ import annotations

import numpy as np

from tdgen.config import TextureConfig
from tdgen.errors import GenerationError
from tdgen.meshdata import Mesh

_MAX_TRIES = 12
"""Re-packs at a lower texel density when the charts spill onto a second atlas page."""


_MAX_PARTS = 64
"""Beyond this many parts the extra seams cost more than the chart time they save."""


def unwrap_mesh(mesh: Mesh, cfg: TextureConfig) -> Mesh:
    """A copy of `mesh` cut along UV seams, with `uvs` [V', 2] in [0, 1] packed in a `cfg.size`²
    texture.

    V' ≥ V: a vertex on a seam is duplicated once per chart it borders; faces keep their order
    and winding.

    UV convention: xatlas reports texel coordinates with row 0 at v = 0, and we keep its v as is,
    so v = 0 is row 0 = the *top* row of our texture image (glTF's convention, DESIGN.md): texel
    (row r, col c) covers [c, c+1)×[r, r+1) in xatlas units and its centre is
    uv = ((c + 0.5)/S, (r + 0.5)/S). Nothing is flipped here, in the baker or in the exporter.
    """
    import xatlas

    if mesh.num_faces == 0:
        raise GenerationError(
            "cannot unwrap an empty mesh; lower mesh.threshold so a surface is found"
        )
    size = int(cfg.size)
    positions = np.ascontiguousarray(mesh.vertices, dtype=np.float32)  # [V, 3]
    indices = np.ascontiguousarray(mesh.faces, dtype=np.uint32)  # [F, 3]
    normals = np.ascontiguousarray(mesh.normals, dtype=np.float32)  # [V, 3]

    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.bilinear = True  # leave a texel of gutter so bilinear lookups do not bleed across charts
    pack.blockAlign = True  # faster packing, at a small cost in utilisation
    # Many small charts in a small texture can need more gutter than there is room for: then
    # accept a narrower gutter (down to one texel) rather than fail the asset.
    paddings = sorted({int(cfg.padding), max(1, int(cfg.padding) // 2), 1}, reverse=True)
    parts = _split(positions, normals, indices, cfg.unwrap_part_faces)
    atlas = None
    for padding in paddings:
        pack.padding = padding
        atlas = _pack(parts, chart, pack, size)
        if atlas is not None:
            break
    if atlas is None:
        raise GenerationError(
            f"xatlas could not pack the UV charts into one {size}² texture; raise texture.size "
            "or lower mesh.triangles"
        )
    width, height = int(atlas.width), int(atlas.height)

    vmapping, new_faces, uvs = _gather(atlas, parts, len(indices))
    # xatlas normalises by its own width/height; express in the size² texture (texel units kept).
    uvs = uvs.astype(np.float64) * np.array([width / size, height / size])
    return Mesh(
        vertices=mesh.vertices[vmapping].astype(np.float32),
        faces=new_faces.astype(np.int64),
        normals=mesh.normals[vmapping].astype(np.float32),
        uvs=np.clip(uvs, 0.0, 1.0).astype(np.float32),
    )


def _split(positions, normals, indices, part_faces: int) -> list[tuple[np.ndarray, ...]]:
    """The mesh cut into compact parts of about `part_faces` faces, each as (face ids [f],
    source vertex ids [v], local indices [f, 3] into those vertices), plus that part's positions
    and normals [v, 3] (sliced once here, not on every packing try).

    xatlas computes each added mesh's charts as a task of its own thread pool, and its chart
    growing costs more than linearly in a mesh's faces: a 20k-face surface in 16 parts unwraps
    2.1 s → 0.6 s on two cores (one core: 2.0 → 1.0 s) at the same texel use, for ~4 % more seam
    vertices (the cuts become chart borders). xatlas has no option for this, so we cut: recursive
    median bisection of face centroids along the longest axis, which keeps parts balanced and
    compact."""
    n = len(indices)
    k = 1 if part_faces <= 0 else int(min(_MAX_PARTS, max(1, round(n / part_faces))))
    groups = [np.arange(n)]
    centroids = positions[indices].mean(axis=1)  # [F, 3]
    while len(groups) < k:
        groups.sort(key=len)
        g = groups.pop()
        if len(g) < 2:
            groups.append(g)
            break
        c = centroids[g]
        axis = int(np.argmax(c.max(axis=0) - c.min(axis=0)))
        order = g[np.argsort(c[:, axis], kind="stable")]
        groups += [order[: len(order) // 2], order[len(order) // 2:]]
    parts = []
    for g in sorted(groups, key=lambda g: int(g[0])):  # bisection never leaves a part empty
        used, local = np.unique(indices[g], return_inverse=True)
        parts.append((g, used, local.reshape(-1, 3).astype(np.uint32),
                      np.ascontiguousarray(positions[used]), np.ascontiguousarray(normals[used])))
    return parts


def _gather(atlas, parts, num_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts' atlas meshes joined back in the input's face order: source vertex [V'],
    faces [F, 3], uvs [V', 2] in [0, 1] of the atlas's W×H."""
    vmaps, uvs = [], []
    faces = np.empty((num_faces, 3), dtype=np.int64)
    offset = 0
    for i, (g, used, *_) in enumerate(parts):
        vmap, part_faces, part_uvs = atlas[i]
        vmaps.append(used[vmap.astype(np.int64)])
        uvs.append(part_uvs)
        faces[g] = part_faces.astype(np.int64) + offset
        offset += len(vmap)
    return np.concatenate(vmaps), faces, np.concatenate(uvs)


def _pack(parts, chart, pack, size: int):
    """One atlas page of at most `size`², or None when the charts do not fit at this padding."""
    import xatlas

    # With texels_per_unit = 0 xatlas estimates a density for `resolution` but then grows the
    # atlas past it (by 1.2–1.7× in our meshes, padding being the slack); with a density set,
    # pages are exactly `resolution`² but charts may spill onto a second page. Every try re-runs
    # the whole (costly) chart computation, so the first asks for 3/4 of the size, which usually
    # lands just inside it; otherwise shrink the density and re-pack.
    texels_per_unit = 0.0
    for attempt in range(_MAX_TRIES):
        pack.texels_per_unit = texels_per_unit
        pack.resolution = int(round(0.75 * size)) if attempt == 0 else size
        atlas = xatlas.Atlas()
        for _, _, local, part_positions, part_normals in parts:
            atlas.add_mesh(part_positions, local, part_normals)
        atlas.generate(chart, pack)
        width, height = int(atlas.width), int(atlas.height)
        if atlas.atlas_count == 1 and width <= size and height <= size:
            return atlas
        if max(width, height) > size:
            shrink = size / max(width, height) * 0.95
        else:  # exact pages, but a second one: padding is a fixed cost, so shrink in bigger steps
            shrink = 0.85
        texels_per_unit = float(atlas.texels_per_unit) * shrink
    return None
