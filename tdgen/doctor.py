"""`tdgen doctor`: is this machine ready to generate? Each failed check carries its fix."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tdgen import __version__
from tdgen.config import DEFAULT_MODEL_ID

MIN_FREE_GB = 6.0  # SD 2.1-base in safetensors is ~5.2 GB (fp32 UNet + text encoder + VAE)


@dataclass
class Check:
    name: str
    status: Literal["ok", "warn", "fail"]
    detail: str
    fix: str = ""


def _check_torch() -> list[Check]:
    import torch

    out = [Check("tdgen", "ok", f"{__version__} on Python {platform.python_version()}, torch {torch.__version__}")]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        status = "ok" if total >= 8 * 2**30 else "warn"
        out.append(
            Check(
                "cuda",
                status,
                f"{name}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), CUDA {torch.version.cuda}",
                "" if status == "ok" else "the standard preset peaks near 8 GB; use --preset draft",
            )
        )
    else:
        out.append(
            Check(
                "cuda",
                "warn",
                "no CUDA GPU visible to PyTorch: generation runs on the CPU (fine for the tiny test "
                "model, far too slow for a full-size one); on an NVIDIA GPU machine install a CUDA torch",
                "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128",
            )
        )
    return out


def _check_gsplat(kernels: bool) -> Check:
    try:
        import gsplat
    except ImportError:
        return Check("gsplat", "fail", "gsplat is not installed", "pip install gsplat")
    import torch

    if not torch.cuda.is_available():
        return Check("gsplat", "ok", f"gsplat {gsplat.__version__} (CPU: the pure-PyTorch renderer is used)")
    if not kernels:
        return Check("gsplat", "warn", f"gsplat {gsplat.__version__}; kernels not checked (--no-kernels)")
    try:
        from tdgen.gaussians import init_ball
        from tdgen.render import orbit_cameras, render_gaussians
        from tdgen.runtime import make_generator

        dev = torch.device("cuda")
        g = init_ball(64, 0.5, 0.5, make_generator(0)).to(dev)
        cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), 2.5, 49.1, 32, 32, device=dev)
        render_gaussians(g, cams, torch.ones(1, 3, device=dev), backend="gsplat")
        torch.cuda.synchronize()
    except Exception as e:  # any build/load failure is what this check is for
        return Check(
            "gsplat",
            "fail",
            f"gsplat's CUDA kernels failed to build or run: {str(e).splitlines()[0][:200]}",
            "install a CUDA toolkit matching torch (nvcc on PATH) and a C++ compiler; see gsplat's install notes",
        )
    return Check("gsplat", "ok", f"gsplat {gsplat.__version__}, CUDA kernels built and ran")


def _check_model(model_id: str) -> Check:
    if os.path.isdir(model_id):
        if (Path(model_id) / "model_index.json").is_file():
            return Check("model", "ok", f"local folder {model_id}")
        return Check("model", "fail", f"{model_id} has no model_index.json", "point --model at a diffusers model folder")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model_index.json")
    except Exception as e:  # a malformed id, for instance
        return Check("model", "fail", f"{model_id}: {e}", "pass a hub id such as " + DEFAULT_MODEL_ID)
    if isinstance(cached, str):
        return Check("model", "ok", f"{model_id} is in the local cache")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    return Check(
        "model",
        "fail" if offline else "warn",
        f"{model_id} is not in the local cache" + (" and HF_HUB_OFFLINE is set" if offline else "; it downloads (~5 GB) on first use"),
        f"hf download {model_id}   (or pass --model PATH to a local diffusers folder)",
    )


def _check_disk() -> list[Check]:
    from huggingface_hub.constants import HF_HUB_CACHE

    out = []
    for label, path in (("disk (cache)", HF_HUB_CACHE), ("disk (cwd)", ".")):
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p).free / 1e9
        status = "ok" if free >= MIN_FREE_GB else "warn"
        out.append(
            Check(label, status, f"{free:.1f} GB free at {p}", "" if status == "ok" else f"free at least {MIN_FREE_GB:.0f} GB or set HF_HOME elsewhere")
        )
    return out


def run_checks(model_id: str | None = None, kernels: bool = True) -> list[Check]:
    """Every check, in the order a user should fix them."""
    checks = _check_torch()
    checks.append(_check_gsplat(kernels))
    checks.append(_check_model(model_id or DEFAULT_MODEL_ID))
    checks += _check_disk()
    return checks
