"""Baking splat colours into the UV texture: sides land where they belong, nothing stays black."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from tdgen.config import TextureConfig
from tdgen.errors import ConfigError, GenerationError
from tdgen.gaussians import C0, Gaussians
from tdgen.meshdata import Mesh
from tdgen.progress import Progress
from tdgen.raster import framing_cameras, render_mesh
from tdgen.texture import bake_directions, bake_texture, chart_mask, fill_gutters

RED = torch.tensor([1.0, 0.0, 0.0])
BLUE = torch.tensor([0.0, 0.0, 1.0])


def two_tone_sphere(n=800, radius=0.5, centre=(0.0, 0.0, 0.0)) -> Gaussians:
    """Gaussians on a sphere surface: red where x > 0, blue where x < 0."""
    i = np.arange(n) + 0.5
    y = 1 - 2 * i / n
    r = np.sqrt(1 - y * y)
    phi = i * math.pi * (3 - math.sqrt(5))
    dirs = np.stack([r * np.cos(phi), y, r * np.sin(phi)], -1)
    means = torch.tensor(dirs * radius + np.asarray(centre), dtype=torch.float32)
    rgb = torch.where(means[:, :1] - centre[0] > 0, RED, BLUE)
    return Gaussians(
        means=means,
        scales=torch.full((n, 3), math.log(0.045 * radius / 0.5)),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        opacities=torch.full((n,), 3.0),
        sh0=(rgb - 0.5) / C0,
        shN=torch.zeros(n, 0, 3),
    )


def uv_sphere(radius=0.5, centre=(0.0, 0.0, 0.0), size=64, extra=None) -> Mesh:
    from tdgen.unwrap import unwrap_mesh

    m = trimesh.creation.icosphere(subdivisions=2, radius=radius)
    verts, faces = m.vertices, m.faces
    normals = m.vertex_normals
    if extra is not None:  # an extra triangle (e.g. hidden inside) appended to the sphere
        base = len(verts)
        verts = np.concatenate([verts, extra])
        faces = np.concatenate([faces, [[base, base + 1, base + 2]]])
        normals = np.concatenate([normals, np.tile([[1.0, 0, 0]], (3, 1))])
    mesh = Mesh(
        vertices=(verts + np.asarray(centre)).astype(np.float32),
        faces=faces.astype(np.int64),
        normals=normals.astype(np.float32),
    )
    return unwrap_mesh(mesh, TextureConfig(size=size, padding=2))


CFG = TextureConfig(size=64, bake_views=6, bake_resolution=32)


def side_colours(mesh, texture):
    cams = framing_cameras(mesh.vertices, [0.0, 0.0], [90.0, -90.0], 32)
    rgb, alpha = render_mesh(mesh, texture, cams, torch.zeros(2, 3))
    m = alpha[..., 0] > 0
    return rgb[0][m[0]].mean(0), rgb[1][m[1]].mean(0)


@pytest.mark.parametrize("centre,radius", [((0.0, 0.0, 0.0), 0.5), ((3.0, -1.0, 2.0), 2.0)])
def test_two_tone_sphere_bakes_red_on_plus_x_and_blue_on_minus_x(centre, radius):
    g = two_tone_sphere(radius=radius, centre=centre)
    mesh = uv_sphere(radius=radius, centre=centre)
    events = []
    tex = bake_texture(g, mesh, CFG, "cpu", on_progress=events.append)
    assert tex.shape == (64, 64, 3) and tex.dtype == torch.float32
    assert tex.min() >= 0 and tex.max() <= 1
    plus_x, minus_x = side_colours(mesh, tex)
    assert plus_x[0] > 0.75 and plus_x[2] < 0.25, plus_x
    assert minus_x[2] > 0.75 and minus_x[0] < 0.25, minus_x
    assert [e.step for e in events] == list(range(CFG.bake_views + 1))
    assert all(isinstance(e, Progress) and e.stage == "bake" for e in events)


def test_every_texel_is_filled_and_gutters_copy_their_nearest_chart_texel():
    g = two_tone_sphere()
    # A triangle hidden inside the sphere near +X: no view sees it, so it takes the nearest seen
    # colour in 3D (red), not black and not its UV neighbour's.
    hidden = np.array([[0.3, -0.05, -0.05], [0.3, 0.05, -0.05], [0.3, 0.0, 0.05]])
    mesh = uv_sphere(extra=hidden)
    tex = bake_texture(g, mesh, CFG, "cpu")
    assert (tex.sum(-1) > 0.3).all()  # no black texel anywhere, gutters included
    inside = chart_mask(mesh, 64)
    assert (~inside).sum() > 100  # the layout has gutters to fill
    from scipy.ndimage import distance_transform_edt

    _, (ri, ci) = distance_transform_edt(~inside.numpy(), return_indices=True)
    assert torch.equal(tex, tex[torch.from_numpy(ri), torch.from_numpy(ci)])
    # The hidden triangle's texels: find them through the UV raster.
    from tdgen.raster import rasterize_uv

    fid, _ = rasterize_uv(torch.from_numpy(mesh.uvs), torch.from_numpy(mesh.faces), 64)
    hidden_texels = tex[fid == len(mesh.faces) - 1]
    assert len(hidden_texels) > 0
    assert (hidden_texels[:, 0] > 0.75).all() and (hidden_texels[:, 2] < 0.25).all()


def test_fill_gutters_propagates_nearest():
    tex = torch.zeros(6, 6, 3)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    tex[1, 1] = torch.tensor([1.0, 0, 0])
    tex[4, 4] = torch.tensor([0, 1.0, 0])
    mask[1, 1] = mask[4, 4] = True
    out = fill_gutters(tex, mask)
    assert torch.equal(out[0, 0], tex[1, 1]) and torch.equal(out[5, 5], tex[4, 4])
    assert torch.equal(out[1, 2], tex[1, 1]) and torch.equal(out[4, 3], tex[4, 4])
    assert torch.equal(out[mask], tex[mask])


def test_bake_directions():
    el, az = bake_directions(26)
    assert len(el) == 26 and (el == 90).sum() == 1 and (el == -90).sum() == 1
    assert sorted(set(el[:24].tolist())) == [-30.0, 0.0, 30.0]
    assert len(set(az[:24].tolist())) == 8
    el, az = bake_directions(10)
    assert len(el) == 10 and el[0] == 90 and el[1] == -90
    assert (np.abs(el[2:]) < 90).all() and len(set(np.round(az[2:], 3))) == 8
    # Fibonacci views are spread: their directions' mean is near the centre.
    d = np.stack([np.cos(np.radians(el)) * np.sin(np.radians(az)), np.sin(np.radians(el)),
                  np.cos(np.radians(el)) * np.cos(np.radians(az))], -1)
    assert np.linalg.norm(d.mean(0)) < 0.2


def test_bake_rejects_bad_inputs():
    g = two_tone_sphere(n=50)
    mesh = uv_sphere()
    with pytest.raises(ConfigError, match="bake_views"):
        bake_texture(g, mesh, TextureConfig(size=64, bake_views=2, bake_resolution=16), "cpu")
    no_uv = Mesh(mesh.vertices, mesh.faces, mesh.normals, None)
    with pytest.raises(GenerationError, match="unwrap"):
        bake_texture(g, no_uv, CFG, "cpu")
    far = two_tone_sphere(n=200, centre=(50.0, 0.0, 0.0))
    with pytest.raises(GenerationError, match="seen"):
        bake_texture(far, mesh, TextureConfig(size=32, bake_views=4, bake_resolution=16), "cpu")


@pytest.mark.gpu
def test_bake_on_cuda_matches_the_sides():
    g = two_tone_sphere()
    mesh = uv_sphere()
    tex = bake_texture(g, mesh, CFG, "cuda")
    assert tex.is_cuda
    plus_x, minus_x = side_colours(mesh, tex.cpu())
    assert plus_x[0] > 0.75 and minus_x[2] > 0.75


def test_a_part_in_front_does_not_ghost_onto_the_surface_behind():
    """A red ball in front of a blue one, its mesh a little smaller than its splat (the soft edge of
    a splat never matches a mesh's hard one): the blue ball's texels next to the red one's outline
    must stay blue, not take the red fringe that the front views see there."""
    from tdgen.raster import rasterize
    from tdgen.render import orbit_cameras
    from tdgen.testing.splats import cat, fibonacci_sphere, isotropic
    from tdgen.unwrap import unwrap_mesh

    def coloured(g: Gaussians, rgb) -> Gaussians:
        return Gaussians(g.means, g.scales, g.quats, g.opacities,
                         ((torch.tensor(rgb) - 0.5) / C0).expand(g.num, 3).clone(), g.shN)

    front_c = np.array([0.0, 0.0, 0.75])
    splat = cat(coloured(isotropic(fibonacci_sphere(1500, 0.5), 0.03, 0.95), BLUE),
                coloured(isotropic(fibonacci_sphere(400, 0.17, front_c), 0.03, 0.95), RED))
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    small = trimesh.creation.icosphere(subdivisions=3, radius=0.17)
    small.apply_translation(front_c)
    both = trimesh.util.concatenate([big, small])
    mesh = unwrap_mesh(Mesh(both.vertices.astype(np.float32), both.faces.astype(np.int64),
                            both.vertex_normals.astype(np.float32)), TextureConfig(size=128, padding=2))
    tex = bake_texture(splat, mesh, TextureConfig(size=128, bake_views=26, bake_resolution=128), "cpu")
    cams = orbit_cameras([0.0, 15.0], [0.0, 20.0], 2.5, 40.0, 160, 160)
    rgb, _ = render_mesh(mesh, tex, cams, torch.zeros(3))
    on_big = rasterize(torch.as_tensor(mesh.vertices), torch.as_tensor(mesh.faces), cams).face_id
    on_big = (on_big >= 0) & (on_big < len(big.faces))  # pixels of the blue ball's faces
    red = rgb[..., 0][on_big]
    # measured .07; without the occluder margin .40
    assert red.quantile(0.99) < 0.2  # the blue ball stays blue right up to the red one's edge


def _closed(tm: trimesh.Trimesh) -> Mesh:
    return Mesh(vertices=tm.vertices.astype(np.float32), faces=tm.faces.astype(np.int64),
                normals=tm.vertex_normals.astype(np.float32))


def _painted(mesh: Mesh, size: int, colour_of) -> torch.Tensor:
    """A texture whose every texel carries colour_of(its 3D point [T, 3], normal [T, 3])."""
    from tdgen.texture import _texel_geometry

    idx, pts, nrm = _texel_geometry(mesh, size, None)
    tex = torch.zeros(size * size, 3)
    tex[idx] = colour_of(pts, nrm).float()
    mask = torch.zeros(size * size, dtype=torch.bool)
    mask[idx] = True
    return fill_gutters(tex.view(size, size, 3), mask.view(size, size))


def test_transfer_texture_carries_colours_to_a_simplified_reunwrapped_copy():
    """Known answer: a sphere painted with its own 3D position, decimated to a quarter and
    unwrapped anew (other charts, other texture size): its texels show their own positions."""
    from tdgen.mesh import decimate, vertex_normals
    from tdgen.texture import _texel_geometry, transfer_texture
    from tdgen.unwrap import unwrap_mesh

    ico = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    src = unwrap_mesh(_closed(ico), TextureConfig(size=256, padding=2))
    src_tex = _painted(src, 256, lambda p, n: p + 0.5)
    v, f = decimate(ico.vertices.astype(np.float32), ico.faces, len(ico.faces) // 4)
    low = unwrap_mesh(Mesh(vertices=v, faces=f, normals=vertex_normals(v, f)), TextureConfig(size=128, padding=2))
    tex = transfer_texture(src, src_tex, low, 128)
    assert tex.shape == (128, 128, 3)
    idx, pts, _ = _texel_geometry(low, 128, None)
    # the decimated sphere lies up to ~1 % inside the original: compare with the radial projection
    want = 0.5 * pts / pts.norm(dim=-1, keepdim=True) + 0.5
    err = (tex.view(-1, 3)[idx] - want).abs().max(-1).values
    assert float(err.median()) < 0.01 and float(err.quantile(0.99)) < 0.03


def test_transfer_texture_takes_a_thin_parts_colour_from_its_own_side():
    """A 2 mm plate, red on top and blue below, thinner than the sample spacing: nearest samples
    alone would lend the top half its underside's blue."""
    from tdgen.texture import _texel_geometry, transfer_texture
    from tdgen.unwrap import unwrap_mesh

    plate = trimesh.creation.box((1.0, 0.002, 1.0)).subdivide().subdivide()
    mesh = unwrap_mesh(_closed(plate), TextureConfig(size=128, padding=2))
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    src_tex = _painted(mesh, 128, lambda p, n: torch.where(n[:, 1:2] > 0, red, blue))
    tex = transfer_texture(mesh, src_tex, mesh, 128)
    idx, _, nrm = _texel_geometry(mesh, 128, None)
    got = tex.view(-1, 3)[idx]
    top, bottom = nrm[:, 1] > 0.9, nrm[:, 1] < -0.9
    assert float((got[top, 0] > 0.9).float().mean()) > 0.99
    assert float((got[bottom, 2] > 0.9).float().mean()) > 0.99
