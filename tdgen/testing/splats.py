"""Small synthetic splats for tests: points on a sphere, isotropic Gaussians, concatenation."""

from __future__ import annotations

import math

import numpy as np
import torch

from tdgen.gaussians import Gaussians


def fibonacci_sphere(n: int, radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:  # [n, 3]
    """`n` points spread evenly over a sphere."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    p = np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)
    return radius * p + np.asarray(centre)


def isotropic(means: np.ndarray, sigma: float, opacity: float) -> Gaussians:  # [N, 3] → N splats
    """Round grey Gaussians of std-dev `sigma` and opacity `opacity` at `means`."""
    n = len(means)
    return Gaussians(
        means=torch.tensor(means, dtype=torch.float32),
        scales=torch.full((n, 3), math.log(sigma)),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        opacities=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh0=torch.zeros(n, 3),
        shN=torch.zeros(n, 0, 3),
    )


def cat(*gs: Gaussians) -> Gaussians:
    """One splat holding every Gaussian of `gs`."""
    return Gaussians(*(torch.cat(parts) for parts in zip(*(g._fields() for g in gs))))
