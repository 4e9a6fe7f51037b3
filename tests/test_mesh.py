"""Density grid → marching cubes → clean → decimate, on spheres of Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

import tdgen.mesh as mesh_mod
from tdgen.config import MeshConfig
from tdgen.errors import GenerationError
from tdgen.gaussians import Gaussians
from tdgen.mesh import density_grid, extract_mesh


def fibonacci_sphere(n: int, radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:  # [n, 3]
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    p = np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)
    return radius * p + np.asarray(centre)


def isotropic(means: np.ndarray, sigma: float, opacity: float) -> Gaussians:
    n = len(means)
    return Gaussians(
        means=torch.tensor(means, dtype=torch.float32),
        scales=torch.full((n, 3), math.log(sigma)),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        opacities=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh0=torch.zeros(n, 3),
        shN=torch.zeros(n, 0, 3),
    )


def cat(a: Gaussians, b: Gaussians) -> Gaussians:
    return Gaussians(*(torch.cat([x, y]) for x, y in zip(a._fields(), b._fields())))


@pytest.fixture(scope="module")
def sphere_mesh():
    # A hollow shell of small splats, like a stage-1 result: the iso-surface sits about one σ
    # outside the shell centre (σ·√(2 ln(D/threshold)) with peak density D ≈ 1.5 here).
    g = isotropic(fibonacci_sphere(8000, 0.5), sigma=0.01, opacity=0.95)
    return extract_mesh(g, MeshConfig(grid=80, triangles=5000), "cpu")


def test_sphere_is_watertight_round_and_outward(sphere_mesh):
    m = sphere_mesh
    assert m.vertices.dtype == np.float32 and m.faces.dtype == np.int64
    assert m.normals.dtype == np.float32 and m.uvs is None
    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    assert tm.is_watertight
    radius = np.linalg.norm(m.vertices, axis=1)
    assert abs(radius.mean() - 0.5) < 0.02 * 0.5
    assert radius.std() < 0.005
    # One closed outer surface: the inner wall of the hollow shell was filled away.
    assert len(trimesh.graph.connected_components(tm.face_adjacency)) == 1
    # CCW seen from outside: face normals point away from the centre, volume positive.
    assert (np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center) > 0).all()
    assert tm.volume > 0
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", m.normals, m.vertices) > 0).all()


def test_decimation_meets_triangle_budget(sphere_mesh):
    assert 4000 <= sphere_mesh.num_faces <= 5000
    g = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    small = extract_mesh(g, MeshConfig(grid=48, triangles=300), "cpu")
    assert 150 <= small.num_faces <= 300
    assert trimesh.Trimesh(small.vertices, small.faces, process=False).is_watertight


def test_min_component_drops_small_far_blob():
    shell = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    # ~0.06 in radius: about 1 % of the shell's faces, below the 2 % cut.
    # close enough to count as part of the object, not as a stray floater
    blob = isotropic(fibonacci_sphere(8, 0.01, centre=(0.72, 0.0, 0.0)), sigma=0.03, opacity=0.9)
    g = cat(shell, blob)
    kept = extract_mesh(g, MeshConfig(grid=64, triangles=100_000, min_component=0.0), "cpu")
    assert (kept.vertices[:, 0] > 0.64).any()
    dropped = extract_mesh(g, MeshConfig(grid=64, triangles=100_000, min_component=0.02), "cpu")
    assert not (dropped.vertices[:, 0] > 0.64).any()
    assert np.linalg.norm(dropped.vertices, axis=1).max() < 0.6


def test_far_floaters_do_not_shrink_the_object():
    """A captured scene's stray splats far away (and a few huge ones) must not set the lattice:
    the object keeps its resolution and its radius."""
    shell = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    floaters = isotropic(np.array([[20.0, 0.0, 0.0], [0.0, -15.0, 3.0]]), sigma=0.05, opacity=0.99)
    huge = isotropic(np.array([[0.0, 0.0, 0.0]]), sigma=5.0, opacity=0.02)  # faint, but enormous
    mesh = extract_mesh(cat(cat(shell, floaters), huge), MeshConfig(grid=64, triangles=100_000), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.max() < 0.6
    assert abs(r.mean() - 0.52) < 0.03  # the shell's iso-surface, traced at full resolution
    assert mesh.num_faces > 2000


def _brute_density(means, covs, alphas, origin, voxel, grid):  # every Gaussian at every voxel
    axis = torch.arange(grid, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pts = pts * voxel + origin.double()
    d = pts[:, None, :] - means.double()[None]  # [P, N, 3]
    m = torch.einsum("pni,nij,pnj->pn", d, torch.linalg.inv(covs.double()), d)
    return (alphas.double()[None] * torch.exp(-0.5 * m)).sum(1).reshape(grid, grid, grid)


@pytest.mark.parametrize("pairs_per_pass", [1 << 20, 257])
def test_density_grid_matches_brute_force(monkeypatch, pairs_per_pass):
    # A tiny pass size forces the sliced-stencil path for the big splat.
    monkeypatch.setitem(mesh_mod._PAIRS_PER_PASS, "cpu", pairs_per_pass)
    gen = torch.Generator().manual_seed(0)
    n = 30
    g = Gaussians(
        means=torch.rand(n, 3, generator=gen) - 0.5,
        scales=torch.log(torch.rand(n, 3, generator=gen) * 0.06 + 0.01),
        quats=torch.randn(n, 4, generator=gen),
        opacities=torch.randn(n, generator=gen),
        sh0=torch.zeros(n, 3),
        shN=torch.zeros(n, 0, 3),
    )
    g.scales[0] = math.log(0.3)  # one splat spanning most of the lattice (rounded stencil)
    grid = 24
    dens, origin, voxel = density_grid(g.means, g.covariances(), g.alpha(), grid)
    ref = _brute_density(g.means, g.covariances(), g.alpha(), origin, voxel, grid)
    # Only the tails beyond each splat's ±3σ box are left out: ≤ α·e^(−4.5) per splat.
    err = (dens.double() - ref).abs()
    assert err.max() < 0.012 * float(g.alpha().sum())
    assert err.mean() < 1e-3
    assert float(ref.max()) > 0.5  # the comparison is not vacuous
    # The lattice is cubic and holds every mean ± 3σ inside it.
    lo = ((g.means - origin) / voxel).min()
    hi = ((g.means - origin) / voxel).max()
    assert lo > 0 and hi < grid - 1


def test_empty_splat_raises_generation_error():
    g = isotropic(fibonacci_sphere(100, 0.5), sigma=0.02, opacity=0.001)
    with pytest.raises(GenerationError, match="min_opacity"):
        extract_mesh(g, MeshConfig(grid=32), "cpu")
    # opacities above min_opacity but a peak density too faint to be a surface
    g = isotropic(fibonacci_sphere(100, 0.5), sigma=0.02, opacity=0.01)
    with pytest.raises(GenerationError, match="lower mesh.threshold"):
        extract_mesh(g, MeshConfig(grid=32, threshold=1.0), "cpu")


def test_faint_splat_is_traced_at_half_its_peak():
    """A splat whose density never reaches the iso-level still gives its shape, not an error."""
    g = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.03, opacity=0.9)
    mesh = extract_mesh(g, MeshConfig(grid=48, threshold=50.0, triangles=2000), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert mesh.num_faces > 100
    assert abs(r.mean() - 0.5) < 0.05


def test_progress_reports_grid_and_mesh_stages():
    events = []
    g = isotropic(fibonacci_sphere(2000, 0.5), sigma=0.03, opacity=0.9)
    extract_mesh(g, MeshConfig(grid=32, triangles=500), "cpu", on_progress=events.append)
    stages = [e.stage for e in events]
    assert "grid" in stages and stages[-1] == "mesh"
    assert events[-1].step == events[-1].total


@pytest.mark.gpu
def test_density_grid_cuda_matches_cpu():
    g = isotropic(fibonacci_sphere(4000, 0.5), sigma=0.015, opacity=0.9)
    cpu, o_cpu, v_cpu = density_grid(g.means, g.covariances(), g.alpha(), 64)
    g = g.to("cuda")
    gpu, o_gpu, v_gpu = density_grid(g.means, g.covariances(), g.alpha(), 64)
    assert v_gpu == pytest.approx(v_cpu, rel=1e-5)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_sparse_thin_shell_gives_no_inner_wall():
    """A shell with pinholes (splats thinner than a voxel, spaced apart) must still be filled:
    otherwise marching cubes adds an inward-facing wall inside the object."""
    # spacing ≈ 2σ and σ ≈ half a voxel: the iso-shell is about one voxel thick, with pinholes
    g = isotropic(fibonacci_sphere(20000, 0.5), sigma=0.006, opacity=0.95)
    mesh = extract_mesh(g, MeshConfig(grid=96, triangles=4000), "cpu")
    centres = mesh.vertices[mesh.faces].mean(1)
    n = np.cross(mesh.vertices[mesh.faces[:, 1]] - mesh.vertices[mesh.faces[:, 0]],
                 mesh.vertices[mesh.faces[:, 2]] - mesh.vertices[mesh.faces[:, 0]])
    inward = (np.einsum("ij,ij->i", n, centres) < 0).mean()
    assert inward < 0.02, f"{inward:.1%} of faces face inward"
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.min() > 0.48  # no wall inside the shell
