"""The PyTorch twin's crossing-depth render (`twin.render_depth`), checked on known answers."""

from __future__ import annotations

import math

import pytest
import torch

from tdgen.render import orbit_cameras
from tdgen.testing.splats import cat, fibonacci_sphere, isotropic
from tdgen.twin import render_depth

RADIUS = 2.0  # camera distance to the origin


def _centre(x: torch.Tensor) -> float:  # [1, H, W, 1] → the value at the image centre
    H, W = x.shape[1:3]
    return float(x[0, H // 2, W // 2, 0])


def front_camera(res: int = 33):
    return orbit_cameras([0.0], [0.0], RADIUS, 30.0, res, res)


def test_blob_surface_is_where_its_ramp_reaches_the_level():
    # One round blob at the origin: along the central ray its alpha is o·exp(−s²/2σ²), so the
    # ray reaches `level` at s = σ·sqrt(2·ln(o/level)) in front of the centre.
    sigma, o, level = 0.05, 0.9, 0.5
    g = isotropic(torch.zeros(1, 3).numpy(), sigma, o)
    alpha, z = render_depth(g, front_camera(), level)
    assert _centre(alpha) == pytest.approx(o, abs=0.01)
    expected = RADIUS - sigma * math.sqrt(2.0 * math.log(o / level))
    assert _centre(z) == pytest.approx(expected, abs=1e-3)
    # A level the blob never reaches: no surface there (depth 0).
    _, z_high = render_depth(g, front_camera(), 0.95)
    assert _centre(z_high) == 0.0


def test_flat_surfel_surface_is_its_plane():
    # A disc facing the camera (normal-axis scale 1e-4): the crossing is on its plane (within
    # about its thickness), not a blob radius in front.
    g = isotropic(torch.zeros(1, 3).numpy(), 0.05, 0.95)
    g.scales[:, 2] = math.log(1e-4)
    _, z = render_depth(g, front_camera(), 0.5)
    assert _centre(z) == pytest.approx(RADIUS, abs=3e-4)


def test_second_layer_crosses_when_the_first_is_faint():
    # A faint blob (0.3) in front of an opaque one: the ray reaches 0.5 only in the back blob,
    # needing 1 − 0.5/0.7 of it (transmittance 0.7 before it).
    front = isotropic(torch.tensor([[0.0, 0.0, 0.3]]).numpy(), 0.02, 0.3)
    back = isotropic(torch.zeros(1, 3).numpy(), 0.02, 0.95)
    _, z = render_depth(cat(front, back), front_camera(), 0.5)
    need = 1.0 - 0.5 / 0.7
    expected = RADIUS - 0.02 * math.sqrt(2.0 * math.log(0.95 / need))
    assert _centre(z) == pytest.approx(expected, abs=2e-3)


def _same_alpha(a: torch.Tensor, b: torch.Tensor, level: float) -> None:
    """Two alpha renders agree: exactly where under `level`, and on which pixels reach it (past
    the level compositing stops early, so the sums there depend on how the work was chunked)."""
    assert torch.equal(a >= level, b >= level)
    low = a < level
    assert (a[low] - b[low]).abs().max() < 1e-3


def _sphere_views(device: str):
    g = isotropic(fibonacci_sphere(3000, 0.5), sigma=0.02, opacity=0.7).to(device)
    cams = orbit_cameras([0.0, 40.0, -70.0, 10.0], [0.0, 90.0, -150.0, 30.0], RADIUS, 40.0, 40, 40,
                         device=device)
    return g, cams


def test_views_batched_equal_views_one_by_one():
    # All views go through one stacked image: no splat may leak into a neighbouring view.
    g, cams = _sphere_views("cpu")
    alpha, z = render_depth(g, cams, 0.5)
    for c in range(len(cams)):
        a1, z1 = render_depth(g, cams.index(slice(c, c + 1)), 0.5)
        _same_alpha(a1[0], alpha[c], 0.5)
        assert ((z1[0] - z[c]).abs() < 1e-3).float().mean() > 0.999
    # The sphere's front at 0.5 m radius, seen from 2 m: the centre pixel's depth is just short of 1.5.
    assert 1.5 - 0.05 < float(z[0, 20, 20, 0]) < 1.5


@pytest.mark.gpu
def test_cuda_equals_cpu():
    g, cams = _sphere_views("cpu")
    a_cpu, z_cpu = render_depth(g, cams, 0.5)
    a_gpu, z_gpu = render_depth(g.to("cuda"), cams.to("cuda"), 0.5)
    _same_alpha(a_gpu.cpu(), a_cpu, 0.5)
    assert ((z_gpu.cpu() - z_cpu).abs() < 1e-3).float().mean() > 0.999
