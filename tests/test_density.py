"""The density method (DreamGaussian's iso-surface): the lattice, faint splats, hollow shells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tdgen.density as density_mod
from tdgen.config import MeshConfig
from tdgen.errors import GenerationError
from tdgen.gaussians import Gaussians
from tdgen.density import density_grid
from tdgen.mesh import extract_mesh
from tdgen.testing.splats import cat, fibonacci_sphere, isotropic


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
    monkeypatch.setitem(density_mod._PAIRS_PER_PASS, "cpu", pairs_per_pass)
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
        extract_mesh(g, MeshConfig(method="density", grid=32), "cpu")
    # opacities above min_opacity but a peak density too faint to be a surface
    g = isotropic(fibonacci_sphere(100, 0.5), sigma=0.02, opacity=0.01)
    with pytest.raises(GenerationError, match="lower mesh.threshold"):
        extract_mesh(g, MeshConfig(method="density", grid=32, threshold=1.0), "cpu")


def test_faint_splat_is_traced_at_half_its_peak():
    """A splat whose density never reaches the iso-level still gives its shape, not an error."""
    g = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.03, opacity=0.9)
    mesh = extract_mesh(g, MeshConfig(method="density", grid=48, threshold=50.0, triangles=2000), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert mesh.num_faces > 100
    assert abs(r.mean() - 0.5) < 0.05


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
    mesh = extract_mesh(g, MeshConfig(method="density", grid=96, triangles=4000), "cpu")
    centres = mesh.vertices[mesh.faces].mean(1)
    n = np.cross(mesh.vertices[mesh.faces[:, 1]] - mesh.vertices[mesh.faces[:, 0]],
                 mesh.vertices[mesh.faces[:, 2]] - mesh.vertices[mesh.faces[:, 0]])
    inward = (np.einsum("ij,ij->i", n, centres) < 0).mean()
    assert inward < 0.02, f"{inward:.1%} of faces face inward"
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.min() > 0.48  # no wall inside the shell


def test_far_floaters_do_not_shrink_the_density_lattice():
    shell = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.9)
    floaters = isotropic(np.array([[20.0, 0.0, 0.0], [0.0, -15.0, 3.0]]), sigma=0.05, opacity=0.99)
    huge = isotropic(np.array([[0.0, 0.0, 0.0]]), sigma=5.0, opacity=0.02)  # faint, but enormous
    mesh = extract_mesh(cat(cat(shell, floaters), huge), MeshConfig(method="density", grid=64, triangles=100_000), "cpu")
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.max() < 0.6
    assert abs(r.mean() - 0.52) < 0.03  # the shell's iso-surface, traced at full resolution
    assert mesh.num_faces > 2000
