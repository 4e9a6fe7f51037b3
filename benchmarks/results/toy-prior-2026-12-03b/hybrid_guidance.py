"""The one row no Stage1Config expresses: latent SDS at guidance G_LAT for the first P0 of the
steps, then image-space SDS at guidance G_IMG (sds_image_start = P0 with one guidance scale for
both parts is `eval_stage1.py --set`). Same protocol and output as eval_stage1.py.

    python hybrid_guidance.py OUT_PREFIX P0 G_IMG G_LAT [--seeds 0,1,2] [--threads 1]
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.toy_prior.evaluate import load_prior, stage1_config, stage1_recovery  # noqa: E402
from tdgen.guidance import SDSGuidance  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("p0", type=float)
ap.add_argument("g_img", type=float)
ap.add_argument("g_lat", type=float)
ap.add_argument("--seeds", default="0,1,2")
ap.add_argument("--objects", default="mug,chair,car,boot")
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
latent_loss = SDSGuidance.loss


def switching_loss(self, images, cams, backgrounds, progress):
    # The switch swaps the whole config, so the image part also runs at its own guidance.
    if progress >= a.p0 and self.cfg.sds_space != "image":
        self.cfg = replace(self.cfg, sds_space="image", sds_image_start=0.0,
                           guidance_scale=a.g_img)
    return latent_loss(self, images, cams, backgrounds, progress)


SDSGuidance.loss = switching_loss
prior = load_prior(ROOT / "benchmarks" / "toy_prior_model", "cpu")
with open(f"{a.out}.jsonl", "a") as f:
    for seed in [int(s) for s in a.seeds.split(",")]:
        for obj in a.objects.split(","):
            torch.manual_seed(seed)
            cfg = stage1_config(steps=200, num_points=800, max_points=2000, guidance_scale=a.g_lat)
            r = stage1_recovery(prior, obj, cfg, seed=seed, backend="torch",
                                images=Path(f"{a.out}_{obj}_s{seed}.png"))
            r.update(seed=seed, hybrid=dict(p0=a.p0, g_img=a.g_img, g_lat=a.g_lat))
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(json.dumps(r), flush=True)
