"""Device choice and seeding, shared by every stage."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

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


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """On the CPU, PyTorch's deterministic algorithms for the duration (restored afterwards).

    Measured with --preset smoke on 2 threads: three runs of one seed gave three different .ply
    hashes without it, identical ones with it, at no measurable cost. On CUDA it stays off:
    gsplat's backward accumulates with atomic adds whatever torch is told, and torch's own switch
    would make index_add_ and friends raise without CUBLAS_WORKSPACE_CONFIG.
    """
    if device.type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    _set_deterministic(True)
    try:
        yield
    finally:
        _set_deterministic(was, warn_only)


def _set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms without importing inductor where nothing compiles.

    The public switch also sets inductor's own flag, and importing `torch._inductor` for it took
    ~2 s of a 25 s `tdgen mesh` on a 2-core CPU. Inductor compiles only on CUDA here; where it is
    already imported, the public switch is used so its flag follows."""
    import sys

    if "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)
