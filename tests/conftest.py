"""Shared fixtures: a tiny random diffusion model on disk and a CPU-sized config."""

from __future__ import annotations

import os
import tempfile

# Busy-waiting OpenMP threads make every op many times slower when other jobs share the 2 CPU
# cores of a dev box or CI runner; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests must never reach the hub; a missing model must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# File hashes persist between runs (tdgen.model.hash_cache_file); never in the user's own cache.
os.environ["TDGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tdgen-test-cache-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly-initialised SD model folder, loadable with `--model DIR`."""
    from tdgen.testing.tiny_model import write_tiny_model

    path = tmp_path_factory.mktemp("tiny_model")
    write_tiny_model(path)
    return path


@pytest.fixture()
def tiny_config(tiny_model_dir):
    """A Config small enough for a CPU run of the whole pipeline in seconds."""
    from tdgen.config import resolve_config

    return resolve_config(
        "draft",
        {
            "model.id": str(tiny_model_dir),
            "stage1.steps": 6,
            "stage1.resolution": 64,
            "stage1.encode_resolution": 64,
            "stage1.num_points": 400,
            "stage1.max_points": 2000,
            "mesh.grid": 48,
            "mesh.views": 12,
            "mesh.view_resolution": 96,
            "mesh.triangles": 800,
            "texture.size": 64,
            "texture.bake_views": 6,
            "texture.bake_resolution": 64,
            "texture.refine_steps": 2,
            "texture.refine_resolution": 64,
            "texture.refine_ddim_steps": 10,
        },
    )
