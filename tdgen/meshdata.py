"""The plain triangle-mesh container that mesh, unwrap, texture, raster and export pass around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Mesh:
    vertices: np.ndarray
    """[V, 3] float32, world units, +Y up, front toward +Z."""
    faces: np.ndarray
    """[F, 3] int64, counter-clockwise seen from outside (glTF front faces)."""
    normals: np.ndarray
    """[V, 3] float32, unit vertex normals."""
    uvs: np.ndarray | None = None
    """[V, 2] float32 in [0, 1], glTF convention (v = 0 is the top row of the texture)."""

    @property
    def num_faces(self) -> int:
        return int(len(self.faces))

    @property
    def num_vertices(self) -> int:
        return int(len(self.vertices))
