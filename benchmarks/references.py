"""Reference objects with known geometry and texture, for the known-answer quality benchmark.

Each is a textured `Mesh` in the library's world frame (+Y up, front +Z, centred, bounding radius
about 0.5 like the stage-1 init ball) plus its texture `[S, S, 3]` (row 0 = top, glTF uvs).
Shapes are surfaces of revolution and boxes built here, so their UVs are exact and their
colours are functions we choose: a checker, two flat colours, stripes, and an asymmetric mug with
a thin handle and a front logo (a left/right or front/back flip cannot hide in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tdgen.errors import InputError
from tdgen.meshdata import Mesh

TEXTURE_SIZE = 256
"""Texels per side of a reference texture (renders sample it bilinearly)."""

_GUTTER = 4
"""Texels each atlas region is painted beyond its uv rectangle, so bilinear lookups at a region's
edge never read a neighbour's colour."""


@dataclass
class Reference:
    name: str
    mesh: Mesh
    """World frame, +Y up, front +Z, bounding-box centre at the origin, radius ~0.5."""
    texture: np.ndarray
    """[S, S, 3] float32 in [0, 1], row 0 = top (glTF)."""


@dataclass
class _Part:
    vertices: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3]
    uvs: np.ndarray  # [V, 2] glTF


# ---------------------------------------------------------------------------------------------
# Geometry pieces


def _revolve(
    profile: np.ndarray,  # [P, 2] (rho, y), traversed clockwise in the (rho, y) half-plane
    segments: int,
    rect: tuple[float, float, float, float],  # (u0, v0, u1, v1) of the atlas region
    phi_range: tuple[float, float] = (-180.0, 180.0),
    frame: np.ndarray | None = None,  # [3, 3] rotation, local → world
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> _Part:
    """Surface of revolution about the local Y axis, φ measured from +Z toward +X.

    A clockwise profile (top → outer side → bottom) winds the faces CCW seen from outside; the
    seam column is duplicated so uvs do not wrap. u follows φ, v the profile's arc length.
    """
    phi = np.radians(np.linspace(phi_range[0], phi_range[1], segments + 1))  # [S+1]
    seg = np.linalg.norm(np.diff(profile, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)]) / max(seg.sum(), 1e-12)  # [P] arc length in [0, 1]
    rho, y = profile[:, 0], profile[:, 1]
    verts = np.stack(
        [rho[:, None] * np.sin(phi)[None], np.broadcast_to(y[:, None], (len(y), len(phi))),
         rho[:, None] * np.cos(phi)[None]], axis=-1
    ).reshape(-1, 3)  # [P·(S+1), 3]
    u0, v0, u1, v1 = rect
    uu = np.linspace(0.0, 1.0, segments + 1)
    uvs = np.stack(np.broadcast_arrays(u0 + (u1 - u0) * uu[None], v0 + (v1 - v0) * s[:, None]), -1)
    idx = np.arange(len(verts)).reshape(len(profile), segments + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = np.concatenate([np.stack([a, d, c], -1).reshape(-1, 3), np.stack([a, c, b], -1).reshape(-1, 3)])
    if frame is not None:
        verts = verts @ np.asarray(frame, np.float64).T
    verts = verts + np.asarray(offset)
    return _Part(verts, faces, uvs.reshape(-1, 2))


def _box(lo, hi, uv: tuple[float, float]) -> _Part:
    """Axis-aligned box, one flat colour (every vertex at the same uv)."""
    import trimesh

    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    tm = trimesh.creation.box(extents=hi - lo)
    verts = np.asarray(tm.vertices) + (lo + hi) / 2
    return _Part(verts, np.asarray(tm.faces), np.tile(np.asarray(uv, np.float64), (len(verts), 1)))


def _quad(corners, outward, uv: tuple[float, float]) -> _Part:
    """A flat quad (4 corners in order around it), one flat colour, wound CCW seen from the side
    `outward` [3] points to."""
    v = np.asarray(corners, np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    if np.dot(np.cross(v[1] - v[0], v[2] - v[0]), outward) < 0:
        faces = faces[:, ::-1]
    return _Part(v, faces, np.tile(np.asarray(uv, np.float64), (4, 1)))


def _circle_profile(centre_rho: float, radius: float, n: int) -> np.ndarray:  # [n+1, 2]
    # Clockwise in (rho, y): top → outer → bottom → inner → top.
    t = np.linspace(0.0, 2 * math.pi, n + 1)
    return np.stack([centre_rho + radius * np.sin(t), radius * np.cos(t)], -1)


def _merge(name: str, parts: list[_Part], texture: np.ndarray) -> Reference:
    import trimesh

    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    v = np.concatenate([p.vertices for p in parts]).astype(np.float32)
    f = np.concatenate([p.faces + o for p, o in zip(parts, offsets)]).astype(np.int64)
    uv = np.concatenate([p.uvs for p in parts]).astype(np.float32)
    v -= (v.min(0) + v.max(0)) / 2  # bounding-box centre at the origin
    normals = np.asarray(trimesh.Trimesh(v, f, process=False).vertex_normals, np.float32)
    return Reference(name, Mesh(v, f, normals, uv), texture.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Texture atlas painting


def _paint(tex: np.ndarray, rect, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Fill the texels of `rect` (plus a gutter) with fn(u, v) → [..., 3], u, v ∈ [0, 1] local."""
    S = tex.shape[0]
    u0, v0, u1, v1 = rect
    c0, c1 = max(0, int(u0 * S) - _GUTTER), min(S, int(math.ceil(u1 * S)) + _GUTTER)
    r0, r1 = max(0, int(v0 * S) - _GUTTER), min(S, int(math.ceil(v1 * S)) + _GUTTER)
    cu = ((np.arange(c0, c1) + 0.5) / S - u0) / (u1 - u0)
    rv = ((np.arange(r0, r1) + 0.5) / S - v0) / (v1 - v0)
    U, V = np.meshgrid(np.clip(cu, 0, 1), np.clip(rv, 0, 1))
    tex[r0:r1, c0:c1] = fn(U, V)


def _flat(colour) -> Callable:
    return lambda U, V: np.broadcast_to(np.asarray(colour, np.float32), U.shape + (3,))


def _pick(mask: np.ndarray, a, b) -> np.ndarray:
    return np.where(mask[..., None], np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---------------------------------------------------------------------------------------------
# The objects


def checker_sphere(segments: int = 64) -> Reference:
    """Radius-0.5 sphere, 8 × 4 checker (seam at the back)."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rect = (0.02, 0.02, 0.98, 0.98)
    _paint(tex, rect, lambda U, V: _pick(
        (np.floor(U * 8).astype(int) + np.floor(V * 4).astype(int)) % 2 == 0,
        (0.95, 0.55, 0.10), (0.10, 0.45, 0.60)))
    theta = np.linspace(0.0, math.pi, segments // 2 + 1)
    profile = np.stack([0.5 * np.sin(theta), 0.5 * np.cos(theta)], -1)
    return _merge("sphere", [_revolve(profile, segments, rect)], tex)


def two_colour_table() -> Reference:
    """A table of five boxes: a wide top in one colour, four legs in another."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    top_c, leg_c = (0.62, 0.36, 0.16), (0.12, 0.20, 0.55)
    _paint(tex, (0.0, 0.0, 0.5, 1.0), _flat(top_c))
    _paint(tex, (0.5, 0.0, 1.0, 1.0), _flat(leg_c))
    parts = [_box((-0.45, 0.12, -0.28), (0.45, 0.22, 0.28), (0.25, 0.5))]
    for x in (-0.37, 0.37):
        for z in (-0.2, 0.2):
            parts.append(_box((x - 0.045, -0.34, z - 0.045), (x + 0.045, 0.12, z + 0.045), (0.75, 0.5)))
    return _merge("table", parts, tex)


def striped_torus(segments: int = 64) -> Reference:
    """A ring standing upright facing the front (hole along Z), 12 stripes around it."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rect = (0.02, 0.02, 0.98, 0.98)
    _paint(tex, rect, lambda U, V: _pick(np.floor(U * 12).astype(int) % 2 == 0,
                                         (0.85, 0.10, 0.12), (0.95, 0.92, 0.80)))
    # Local Y (the revolution axis) → world Z: a proper rotation about X.
    frame = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    part = _revolve(_circle_profile(0.33, 0.13, 24), segments, rect, frame=frame)
    return _merge("torus", [part], tex)


def handled_mug(segments: int = 64) -> Reference:
    """A lidded mug with a thin handle on +X and a yellow logo on the front (+Z): asymmetric
    left/right and front/back, and the handle (7 cm thick at 0.5 radius) tests thin parts."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    body_rect, handle_rect = (0.0, 0.0, 0.7, 1.0), (0.75, 0.0, 1.0, 1.0)
    R, H = 0.26, 0.30  # body radius, half height
    profile = np.array([[0.0, H], [R, H], [R, H - 0.02], [R, -H], [0.0, -H]])
    # Dense profile so the long side gets enough rows for the texture bands.
    dense = np.concatenate([np.linspace(a, b, 12, endpoint=False) for a, b in zip(profile[:-1], profile[1:])]
                           + [profile[-1:]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    arc /= arc[-1]
    side_v0, side_v1 = arc[24], arc[36]  # where the side wall starts and ends along the profile

    def body(U, V):
        cream, blue, yellow = (0.92, 0.88, 0.76), (0.16, 0.30, 0.70), (0.98, 0.80, 0.05)
        h = (V - side_v0) / (side_v1 - side_v0)  # 0 at the rim, 1 at the foot, on the wall
        out = _pick((h > 0.06) & (h < 0.2), blue, cream)
        logo = (np.abs(U - 0.5) < 0.07) & (h > 0.35) & (h < 0.65)  # φ = 0 is the front (+Z)
        return _pick(logo, yellow, out)

    _paint(tex, body_rect, body)
    _paint(tex, handle_rect, _flat((0.55, 0.08, 0.10)))
    # Handle: a half torus in the XY plane bulging toward +X, ends buried in the wall.
    frame = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # local Y → Z, Z → X
    handle = _revolve(_circle_profile(0.17, 0.035, 16), 32, handle_rect, phi_range=(-105.0, 105.0),
                      frame=frame, offset=(R, 0.0, 0.0))
    return _merge("mug", [_revolve(dense, segments, body_rect), handle], tex)


def half_sphere(segments: int = 64) -> Reference:
    """Radius-0.5 sphere, red on the +X half and blue on the −X half: a left/right flip or a
    colour bleeding across the seam shows at once."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rect = (0.02, 0.02, 0.98, 0.98)
    # u follows φ from −180° (back) through 0 (front, +Z) to +180°; +X is φ = +90°, so x > 0 ⇔ u > 0.5.
    _paint(tex, rect, lambda U, V: _pick(U > 0.5, (0.85, 0.12, 0.10), (0.12, 0.25, 0.85)))
    theta = np.linspace(0.0, math.pi, segments // 2 + 1)
    profile = np.stack([0.5 * np.sin(theta), 0.5 * np.cos(theta)], -1)
    return _merge("halfsphere", [_revolve(profile, segments, rect)], tex)


def slab_chair() -> Reference:
    """A chair 1 m tall before scaling: an 8 cm seat slab, a 7 cm backrest on the back (−Z) and
    four 6 cm legs — the thin slabs and posts that real splats of furniture are made of."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    seat_c, back_c, leg_c = (0.80, 0.20, 0.15), (0.95, 0.75, 0.20), (0.25, 0.16, 0.10)
    _paint(tex, (0.0, 0.0, 0.33, 1.0), _flat(seat_c))
    _paint(tex, (0.33, 0.0, 0.66, 1.0), _flat(back_c))
    _paint(tex, (0.66, 0.0, 1.0, 1.0), _flat(leg_c))
    w, d = 0.25, 0.25  # half width (x), half depth (z)
    parts = [_box((-w, 0.45, -d), (w, 0.53, d), (0.165, 0.5)),
             _box((-w, 0.53, -d), (w, 1.0, -d + 0.07), (0.495, 0.5))]
    for x in (-w + 0.03, w - 0.03):
        for z in (-d + 0.03, d - 0.03):
            parts.append(_box((x - 0.03, 0.0, z - 0.03), (x + 0.03, 0.45, z + 0.03), (0.83, 0.5)))
    return _scaled(_merge("chair", parts, tex))


def pole_lamp(segments: int = 48) -> Reference:
    """A floor lamp: a 7 cm round base, a 7 cm pole 0.8 m long, a conical shade — a thin pole
    between two wide parts."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rects = [(0.0, 0.0, 0.33, 1.0), (0.33, 0.0, 0.66, 1.0), (0.66, 0.0, 1.0, 1.0)]
    _paint(tex, rects[0], _flat((0.15, 0.15, 0.18)))
    _paint(tex, rects[1], _flat((0.75, 0.75, 0.78)))
    _paint(tex, rects[2], lambda U, V: _pick(np.floor(U * 8).astype(int) % 2 == 0,
                                             (0.95, 0.85, 0.55), (0.20, 0.55, 0.35)))
    base = np.array([[0.0, 0.07], [0.2, 0.07], [0.2, 0.0], [0.0, 0.0]])
    pole = np.array([[0.0, 0.86], [0.035, 0.86], [0.035, 0.02], [0.0, 0.02]])
    shade = np.array([[0.0, 1.05], [0.12, 1.05], [0.25, 0.82], [0.0, 0.82]])
    parts = [_revolve(p, segments, r) for p, r in zip((base, pole, shade), rects)]
    return _scaled(_merge("lamp", parts, tex))


def bumpy_rock(segments: int = 96) -> Reference:
    """A closed, bumpy, lopsided solid (radius 0.5 ± 20 %) with mottled grey-brown colour."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rect = (0.02, 0.02, 0.98, 0.98)

    def mottle(U, V):
        n = 0.5 + 0.25 * np.sin(17 * U) * np.cos(11 * V) + 0.25 * np.sin(5 * U + 3 * V)
        a, b = np.array([0.35, 0.30, 0.26]), np.array([0.62, 0.58, 0.50])
        return (a + (b - a) * np.clip(n, 0, 1)[..., None]).astype(np.float32)

    _paint(tex, rect, mottle)
    theta = np.linspace(0.0, math.pi, segments // 2 + 1)
    profile = np.stack([np.sin(theta), np.cos(theta)], -1)
    part = _revolve(profile, segments, rect)
    d = part.vertices / np.linalg.norm(part.vertices, axis=1, keepdims=True)  # unit directions
    # Smooth bumps as a function of direction only, so the duplicated seam column stays welded.
    r = 0.5 * (1.0 + 0.12 * np.sin(3 * d[:, 0] + 1.0) * np.cos(2 * d[:, 1])
               + 0.08 * np.sin(5 * d[:, 2] + 2 * d[:, 0]) + 0.06 * np.cos(7 * d[:, 1] + 3 * d[:, 2]))
    r *= 1.0 + 0.15 * d[:, 0]  # lopsided: fuller on +X
    part.vertices = d * np.stack([r, 0.8 * r, r], -1)  # squashed vertically
    return _scaled(_merge("rock", [part], tex))


def open_bowl(segments: int = 64) -> Reference:
    """A bowl with 3 cm walls open at the top: a concavity the views must see into."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    rect = (0.02, 0.02, 0.98, 0.98)
    _paint(tex, rect, lambda U, V: _pick(V < 0.5, (0.95, 0.92, 0.85), (0.20, 0.40, 0.75)))
    t = np.linspace(0.0, 0.5 * math.pi, 16)
    inner = np.stack([0.47 * np.sin(t), -0.22 * np.cos(t) + 0.03], -1)  # centre → inner rim
    outer = np.stack([0.5 * np.sin(t[::-1]), -0.25 * np.cos(t[::-1]) + 0.03], -1)  # outer rim → foot
    # Clockwise around the wall's cross-section: inner surface up to the rim, over it, down outside.
    profile = np.concatenate([inner, outer])
    return _scaled(_merge("bowl", [_revolve(profile, segments, rect)], tex))


def open_crate() -> Reference:
    """A crate 0.7 × 0.45 m and 0.45 m tall, open at the top, its walls and floor 2 cm thick:
    a deep cavity whose floor only views from high above see, and thin walls. One closed surface
    (outside, rim, inside), with no faces hidden inside the walls."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    out_c, rim_c, in_c = (0.60, 0.22, 0.12), (0.15, 0.12, 0.10), (0.90, 0.78, 0.55)
    for k, c in enumerate((out_c, rim_c, in_c)):
        _paint(tex, (k / 3, 0.0, (k + 1) / 3, 1.0), _flat(c))
    uv_out, uv_rim, uv_in = (((k + 0.5) / 3, 0.5) for k in range(3))
    X, Z, H, t = 0.35, 0.225, 0.45, 0.02
    x, z = X - t, Z - t
    parts = [_quad([(-X, 0, -Z), (X, 0, -Z), (X, 0, Z), (-X, 0, Z)], (0, -1, 0), uv_out),
             _quad([(-x, t, -z), (x, t, -z), (x, t, z), (-x, t, z)], (0, 1, 0), uv_in)]
    # Each side: its outside wall, its strip of rim, its inside wall. A side is the plane
    # n·p = d; `across` runs along it (half-length hw outside, hi inside).
    for n, across in (((1, 0, 0), 2), ((-1, 0, 0), 2), ((0, 0, 1), 0), ((0, 0, -1), 0)):
        n = np.asarray(n, np.float64)
        (d_o, d_i), (hw, hi) = ((X, x), (Z, z)) if n[0] else ((Z, z), (X, x))

        def at(d, a, y, n=n, across=across):
            p = n * d
            p[across], p[1] = a, y
            return p

        parts += [_quad([at(d_o, -hw, 0), at(d_o, hw, 0), at(d_o, hw, H), at(d_o, -hw, H)], n, uv_out),
                  _quad([at(d_o, -hw, H), at(d_o, hw, H), at(d_i, hi, H), at(d_i, -hi, H)], (0, 1, 0), uv_rim),
                  _quad([at(d_i, -hi, t), at(d_i, hi, t), at(d_i, hi, H), at(d_i, -hi, H)], -n, uv_in)]
    return _scaled(_merge("crate", parts, tex))


def bookshelf() -> Reference:
    """A bookshelf 0.7 m wide and 1 m tall, open at the back and front: two 2.5 cm side panels
    and five 2.5 cm shelves — thin slabs stacked with narrow gaps between them."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    _paint(tex, (0.0, 0.0, 0.5, 1.0), _flat((0.45, 0.28, 0.14)))
    _paint(tex, (0.5, 0.0, 1.0, 1.0), _flat((0.85, 0.80, 0.70)))
    t, X, D = 0.025, 0.35, 0.15
    parts = [_box((-X - t, 0.0, -D), (-X, 1.0, D), (0.25, 0.5)), _box((X, 0.0, -D), (X + t, 1.0, D), (0.25, 0.5))]
    for y in (0.0, 0.24, 0.48, 0.72, 1.0 - t):
        parts.append(_box((-X, y, -D), (X, y + t, D), (0.75, 0.5)))
    return _scaled(_merge("shelf", parts, tex))


def _scaled(ref: Reference) -> Reference:
    """Bounding radius 0.5 about the box centre, like the other references."""
    v = ref.mesh.vertices.astype(np.float64)
    v *= 0.5 / float(np.linalg.norm(v, axis=1).max())
    ref.mesh = Mesh(v.astype(np.float32), ref.mesh.faces, ref.mesh.normals, ref.mesh.uvs)
    return ref


BUILDERS: dict[str, Callable[[], Reference]] = {
    "sphere": checker_sphere,
    "table": two_colour_table,
    "torus": striped_torus,
    "mug": handled_mug,
    "halfsphere": half_sphere,
    "chair": slab_chair,
    "lamp": pole_lamp,
    "rock": bumpy_rock,
    "bowl": open_bowl,
    "crate": open_crate,
    "shelf": bookshelf,
}


def build_reference(name: str) -> Reference:
    if name not in BUILDERS:
        raise InputError(f"unknown reference {name!r}; use one of {', '.join(BUILDERS)} or --ref FILE")
    return BUILDERS[name]()


# ---------------------------------------------------------------------------------------------
# Files


def load_textured(path: str | Path) -> tuple[Mesh, np.ndarray]:
    """A textured .glb/.gltf/.obj as (Mesh in its own coordinates, texture [S, S, 3]).

    trimesh flips v to OpenGL's bottom-up convention on load; it is flipped back here. A mesh
    without a texture image gets a 1×1 texture of its base colour (or mid grey).
    """
    import trimesh

    path = Path(path)
    try:
        tm = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many types for unreadable files
        raise InputError(f"{path}: cannot be read as a mesh ({e}); pass a .glb or .obj") from None
    if not isinstance(tm, trimesh.Trimesh) or len(tm.faces) == 0:
        raise InputError(f"{path}: holds no triangles; pass a textured .glb or .obj")
    image, uv = None, None
    vis = tm.visual
    if isinstance(vis, trimesh.visual.TextureVisuals) and vis.uv is not None and len(vis.uv) == len(tm.vertices):
        mat = vis.material
        image = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
        uv = np.asarray(vis.uv, np.float32).copy()
        uv[:, 1] = 1.0 - uv[:, 1]
    if image is not None:
        tex = np.asarray(image.convert("RGB"), np.float32) / 255.0
        S = max(tex.shape[:2])
        if tex.shape[0] != tex.shape[1]:  # sample_texture expects square; resample bilinearly
            from PIL import Image

            tex = np.asarray(image.convert("RGB").resize((S, S), Image.BILINEAR), np.float32) / 255.0
    else:
        colour = np.array([0.5, 0.5, 0.5], np.float32)
        mat = getattr(vis, "material", None)
        base = getattr(mat, "baseColorFactor", None) if mat is not None else None
        if base is not None:
            colour = np.asarray(base[:3], np.float32) / (255.0 if np.max(base) > 1 else 1.0)
        tex = np.broadcast_to(colour, (1, 1, 3)).copy()
        uv = np.full((len(tm.vertices), 2), 0.5, np.float32)
    v = np.asarray(tm.vertices, np.float32)
    f = np.asarray(tm.faces, np.int64)
    normals = np.asarray(tm.vertex_normals, np.float32)
    return Mesh(v, f, normals, uv), tex.astype(np.float32)


def load_reference(path: str | Path) -> Reference:
    """A user mesh as a reference: bounding-box centre at the origin, bounding radius 0.5."""
    mesh, tex = load_textured(path)
    v = mesh.vertices.astype(np.float64)
    v = v - (v.min(0) + v.max(0)) / 2
    v *= 0.5 / max(float(np.linalg.norm(v, axis=1).max()), 1e-9)
    mesh = Mesh(v.astype(np.float32), mesh.faces, mesh.normals, mesh.uvs)
    return Reference(Path(path).stem, mesh, tex)
