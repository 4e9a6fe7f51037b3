"""Time of one SDS loss + backward at the CI config's encode size (64 px) on the toy prior, CPU,
one thread: latent vs image space, batch 1, median of N calls after a warm-up.

    python step_time.py [--calls 60]
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.toy_prior.evaluate import load_prior, stage1_config  # noqa: E402
from tdgen.guidance import SDSGuidance  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=60)
a = ap.parse_args()
torch.set_num_threads(1)
prior = load_prior(ROOT / "benchmarks" / "toy_prior_model", "cpu")
cams = SimpleNamespace(azimuth=torch.zeros(1))
out = {}
for space in ("latent", "image"):
    cfg = replace(stage1_config(steps=200, num_points=800, max_points=2000), sds_space=space,
                  sds_image_start=0.0)
    sds = SDSGuidance(prior, "a mug", cfg, torch.Generator().manual_seed(0))
    times = []
    for k in range(a.calls + 5):
        images = torch.rand(1, 3, 64, 64, requires_grad=True)
        t0 = time.perf_counter()
        sds.loss(images, cams, torch.ones(1, 3), (k % 100) / 100).backward()
        times.append(time.perf_counter() - t0)
    out[space] = round(statistics.median(times[5:]) * 1000, 2)
print(json.dumps({"ms_per_sds_call": out}))
