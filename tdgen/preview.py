"""Looks at the textured mesh before import: a contact sheet (8 views in a 4×2 grid, one PNG) and,
optionally, a turntable (an animated WebP of the asset turning once)."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from torch import Tensor

from tdgen.io import atomic_write_bytes
from tdgen.meshdata import Mesh
from tdgen.raster import framing_cameras, render_mesh

PREVIEW_ELEVATION = 15.0
"""Degrees above the equator: a slight top-down look shows the top without hiding the sides."""
BACKGROUND = (0.85, 0.85, 0.85)
"""Light grey, so both dark and white assets stand out."""


@torch.no_grad()
def _views(mesh: Mesh, texture: Tensor | np.ndarray, azimuths: np.ndarray, size: int) -> Tensor:
    """uint8 [n, size, size, 3]: the mesh from `PREVIEW_ELEVATION` at `azimuths` (degrees, 0 =
    front), all framed alike, on `BACKGROUND`."""
    tex = torch.as_tensor(texture)
    tex = tex.float() / 255.0 if tex.dtype == torch.uint8 else tex.float()  # export takes uint8 too
    cams = framing_cameras(mesh.vertices, np.full(len(azimuths), PREVIEW_ELEVATION), azimuths, size,
                           device=tex.device)
    bg = torch.tensor(BACKGROUND, device=tex.device).expand(len(azimuths), 3)
    rgb, _ = render_mesh(mesh, tex, cams, bg)  # [n, size, size, 3]
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def render_preview(mesh: Mesh, texture: Tensor | np.ndarray, size: int = 256) -> np.ndarray:
    """The 4×2 grid as uint8 [2·size, 4·size, 3]: azimuths 0, 45, …, 315 (front first), row-major."""
    rgb = _views(mesh, texture, np.arange(8) * 45.0, size)  # [8, size, size, 3]
    return rgb.view(2, 4, size, size, 3).permute(0, 2, 1, 3, 4).reshape(2 * size, 4 * size, 3).cpu().numpy()


def write_preview(mesh: Mesh, texture: Tensor | np.ndarray, path: str | os.PathLike,
                  size: int = 256) -> None:
    """Write the 8-view preview PNG to `path` atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render_preview(mesh, texture, size)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


TURNTABLE_FRAMES = 36
"""Frames per turn (10° each)."""
TURNTABLE_SECONDS = 3.0
"""Length of one turn: slow enough to read the texture, short enough to loop in a review."""


def write_turntable(mesh: Mesh, texture: Tensor | np.ndarray, path: str | os.PathLike,
                    size: int = 256) -> None:
    """Write a looping animated WebP of the mesh turning once about +Y (front first, seen from
    `PREVIEW_ELEVATION`) to `path` atomically. WebP rather than GIF: full colour, a fraction of
    the size, and every browser and chat tool plays it."""
    from PIL import Image

    azimuths = np.arange(TURNTABLE_FRAMES) * (360.0 / TURNTABLE_FRAMES)
    frames = []
    for chunk in np.array_split(azimuths, max(1, TURNTABLE_FRAMES // 12)):  # bounded memory
        frames += list(_views(mesh, texture, chunk, size).cpu().numpy())
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], loop=0,
                   duration=int(1000 * TURNTABLE_SECONDS / TURNTABLE_FRAMES), quality=85, method=4)
    atomic_write_bytes(path, buf.getvalue())
