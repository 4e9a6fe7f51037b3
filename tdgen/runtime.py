"""Device choice and seeding, shared by every stage."""

from __future__ import annotations

from typing import Literal

import torch

from tdgen.errors import DeviceError

DeviceName = Literal["auto", "cuda", "cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu "
                "(slow, small sizes only) or install a CUDA build of torch"
            )
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}; use auto, cuda or cpu")


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on `device`, so a seed reproduces the same run on the same machine."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g
