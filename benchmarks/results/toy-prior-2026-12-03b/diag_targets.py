"""What image-space SDS asks for during one CI-sized stage-1 run (seed 0): every 20th step, the
render (resized to the encode size, clamped) beside its decoded target D(x̂0), as one column.

    python diag_targets.py OBJECT OUT.png [--set '{"sds_space": "image", "sds_image_start": 0}']
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.toy_prior.evaluate import load_prior, stage1_config  # noqa: E402
from benchmarks.toy_prior.objects import PROMPTS  # noqa: E402
from tdgen.guidance import SDSGuidance, encode_prompt  # noqa: E402
from tdgen.optimize import optimize_gaussians  # noqa: E402
from tdgen.runtime import make_generator  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("object")
ap.add_argument("out", type=Path)
ap.add_argument("--set", default='{"sds_space": "image", "sds_image_start": 0}')
ap.add_argument("--every", type=int, default=20)
a = ap.parse_args()
torch.set_num_threads(1)
prior = load_prior(ROOT / "benchmarks" / "toy_prior_model", "cpu")
cfg = stage1_config(steps=200, num_points=800, max_points=2000, **json.loads(a.set))
emb = encode_prompt(prior, PROMPTS[a.object], cfg.negative_prompt, cfg.view_prompts)
torch.manual_seed(0)
gen = make_generator(0, "cpu")
sds = SDSGuidance(prior, emb, cfg, gen)
rows = []


class Recorder:
    step = 0

    def loss(self, images, cams, backgrounds, progress):
        value = sds.loss(images, cams, backgrounds, progress)
        if self.step % a.every == 0:
            size = cfg.encode_resolution or images.shape[-1]
            x = F.interpolate(images.detach(), (size, size), mode="bilinear").clamp(0, 1)
            target = sds.last_target if sds.last_target is not None else torch.zeros_like(x)
            rows.append(torch.cat([x[0], target[0]], 2))  # [3, S, 2S]
            print(json.dumps({"step": self.step, "t": int(sds.last_t[0]),
                              "azimuth": round(float(cams.azimuth[0]), 1),
                              "background": float(backgrounds[0, 0]),
                              "loss": round(float(value.detach()), 3)}), flush=True)
        self.step += 1
        return value


optimize_gaussians(Recorder(), cfg, "cpu", gen, backend="torch")
img = (torch.cat(rows, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(a.out)
