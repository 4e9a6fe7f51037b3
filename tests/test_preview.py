"""The 8-view preview sheet and the turntable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from tdgen.config import TextureConfig
from tdgen.meshdata import Mesh
from tdgen.preview import BACKGROUND, TURNTABLE_FRAMES, render_preview, write_preview, write_turntable


def textured_sphere():
    from tdgen.unwrap import unwrap_mesh

    m = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    mesh = unwrap_mesh(
        Mesh(m.vertices.astype(np.float32), m.faces.astype(np.int64), m.vertex_normals.astype(np.float32)),
        TextureConfig(size=64, padding=2),
    )
    tex = torch.zeros(64, 64, 3)
    tex[:32, :, 0] = 1.0  # top half of the atlas red, bottom half blue
    tex[32:, :, 2] = 1.0
    return mesh, tex


def test_write_preview_png_size_and_content(tmp_path):
    mesh, tex = textured_sphere()
    path = tmp_path / "sub" / "a.preview.png"
    write_preview(mesh, tex, path, size=48)
    img = np.asarray(Image.open(path))
    assert img.shape == (96, 192, 3)
    assert not (img == img[0, 0]).all()  # not uniform
    bg = np.round(np.array(BACKGROUND) * 255)
    assert np.abs(img[0, 0].astype(float) - bg).max() <= 1  # corners are background
    # Every tile shows the object at its centre, in texture colours (red or blue, not grey).
    for r in range(2):
        for c in range(4):
            px = img[r * 48 + 24, c * 48 + 24].astype(int)
            assert px[1] < 30 and px[0] + px[2] > 200
    assert [p.name for p in path.parent.iterdir()] == ["a.preview.png"]  # no temp left behind


def test_render_preview_accepts_numpy_uint8():
    mesh, tex = textured_sphere()
    a = render_preview(mesh, tex, size=16)
    b = render_preview(mesh, (tex.numpy() * 255).astype(np.uint8), size=16)
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.gpu
def test_preview_from_a_cuda_texture(tmp_path):
    mesh, tex = textured_sphere()
    assert np.array_equal(render_preview(mesh, tex.cuda(), size=16), render_preview(mesh, tex, size=16))


def test_turntable_is_a_looping_webp_that_turns_once_front_first(tmp_path):
    """36 frames 10° apart: the first is the preview's front view, the 10th (90°) its third tile's
    neighbour in angle, and the frames differ (the sphere's red/blue split turns with it)."""
    from PIL import ImageSequence

    mesh, tex = textured_sphere()
    path = tmp_path / "a.turntable.webp"
    write_turntable(mesh, tex, path, size=32)
    im = Image.open(path)
    assert im.format == "WEBP" and im.is_animated and im.n_frames == TURNTABLE_FRAMES
    assert im.info.get("loop") == 0 and im.size == (32, 32)
    frames = [np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(im)]
    sheet = render_preview(mesh, tex, size=32).astype(int)
    # lossy WebP: compare means of the object's pixels, front (0°) and side (90° = sheet tile 2)
    for frame, tile in ((frames[0], sheet[:32, :32]), (frames[9], sheet[:32, 64:96])):
        assert np.abs(frame.mean((0, 1)) - tile.mean((0, 1))).max() < 6
    assert np.abs(frames[0] - frames[18]).mean() > 5  # the back is not the front
    assert [p.name for p in tmp_path.iterdir()] == ["a.turntable.webp"]
