"""The toy prior's known objects: coloured, and different from the front (+Z) and the back.

Each object is turned 180° about +Y into a visibly different shape (a chair's backrest, a car's
cabin, a boot's toe, a mug's handle), so a result that came out back to front scores low on the
silhouette IoU of the side views, and the colours differ front to back as well.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from benchmarks.references import Reference, TEXTURE_SIZE, _box, _flat, _merge, _paint, handled_mug

_CELLS = 4
"""Flat-colour cells per side of an object's texture atlas (each box samples one cell's centre)."""


def _boxes(name: str, boxes: list[tuple[tuple, tuple, tuple]]) -> Reference:
    """`boxes`: (lo [3], hi [3], rgb) each → a Reference with one flat atlas cell per colour."""
    S = TEXTURE_SIZE
    tex = np.zeros((S, S, 3), np.float32)
    colours = list(dict.fromkeys(c for _, _, c in boxes))
    if len(colours) > _CELLS * _CELLS:
        raise ValueError(f"{name}: more than {_CELLS ** 2} colours")
    uv_of = {}
    for i, c in enumerate(colours):
        r, q = divmod(i, _CELLS)
        rect = (q / _CELLS, r / _CELLS, (q + 1) / _CELLS, (r + 1) / _CELLS)
        _paint(tex, rect, _flat(c))
        uv_of[c] = ((q + 0.5) / _CELLS, (r + 0.5) / _CELLS)
    return _merge(name, [_box(lo, hi, uv_of[c]) for lo, hi, c in boxes], tex)


RED, BLUE, BROWN = (0.80, 0.12, 0.10), (0.12, 0.25, 0.75), (0.40, 0.24, 0.10)
YELLOW, GREEN, GREY = (0.95, 0.80, 0.10), (0.10, 0.55, 0.20), (0.55, 0.55, 0.58)
CYAN, BLACK = (0.55, 0.85, 0.95), (0.08, 0.08, 0.08)


def chair() -> Reference:
    """Red seat, a tall blue backrest at the back (−Z), four brown legs."""
    boxes = [((-0.25, -0.05, -0.25), (0.25, 0.04, 0.25), RED),
             ((-0.25, 0.04, -0.25), (0.25, 0.48, -0.17), BLUE)]
    for x in (-0.21, 0.21):
        for z in (-0.21, 0.21):
            boxes.append(((x - 0.04, -0.42, z - 0.04), (x + 0.04, -0.05, z + 0.04), BROWN))
    return _boxes("chair", boxes)


def car() -> Reference:
    """Red body, a cyan cabin set toward the back, yellow headlights at the front, a grey rear
    bumper, black wheels."""
    boxes = [((-0.22, -0.12, -0.46), (0.22, 0.07, 0.46), RED),
             ((-0.19, 0.07, -0.36), (0.19, 0.27, 0.04), CYAN),
             ((-0.20, -0.06, 0.46), (-0.08, 0.03, 0.50), YELLOW),
             ((0.08, -0.06, 0.46), (0.20, 0.03, 0.50), YELLOW),
             ((-0.22, -0.14, -0.51), (0.22, -0.03, -0.46), GREY)]
    for x in (-0.27, 0.22):
        for z in (-0.30, 0.30):
            boxes.append(((x, -0.25, z - 0.09), (x + 0.05, -0.06, z + 0.09), BLACK))
    return _boxes("car", boxes)


def boot() -> Reference:
    """A yellow shaft standing at the back, a green foot whose toe points to the front (+Z)."""
    boxes = [((-0.14, -0.18, -0.32), (0.14, 0.48, -0.02), YELLOW),
             ((-0.14, -0.45, -0.32), (0.14, -0.18, 0.38), GREEN),
             ((-0.15, -0.46, -0.33), (0.15, -0.40, 0.39), BLACK)]
    return _boxes("boot", boxes)


OBJECTS: dict[str, Callable[[], Reference]] = {
    "chair": chair,
    "car": car,
    "boot": boot,
    "mug": handled_mug,  # benchmarks.references: handle on +X, yellow logo on the front
}
PROMPTS: dict[str, str] = {name: f"a {name}" for name in OBJECTS}
"""The prompt each object is captioned with (view suffixes are added as encode_prompt does)."""


def build_object(name: str) -> Reference:
    if name not in OBJECTS:
        raise KeyError(f"unknown toy object {name!r}; use one of {', '.join(OBJECTS)}")
    return OBJECTS[name]()


def turned(ref: Reference, degrees: float = 180.0) -> Reference:
    """`ref` turned about +Y (a back-to-front result is the object turned 180°)."""
    from tdgen.meshdata import Mesh

    a = np.radians(degrees)
    rot = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]],
                   np.float32)
    m = ref.mesh
    mesh = Mesh(m.vertices @ rot.T, m.faces, None if m.normals is None else m.normals @ rot.T,
                m.uvs)
    return Reference(f"{ref.name}@{degrees:g}", mesh, ref.texture)
