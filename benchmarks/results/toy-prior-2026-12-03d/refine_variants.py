"""Issue 9 items 1 and 3 on a splat whose colours are right: one stage-1 splat of `toy_prior eval`
(image-space SDS), meshed and textured again by `tdgen mesh SPLAT --prompt` with each refinement
variant; the .glb measured as `eval` measures it (colour error where both silhouettes overlap).

    python refine_variants.py OBJ SPLAT.ply OUTDIR [--threads 2]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.toy_prior.make_eval import _prior_image, measure_object, scaled_sets  # noqa: E402
from benchmarks.toy_prior.objects import PROMPTS  # noqa: E402
from tdgen.config import resolve_config  # noqa: E402

MODEL = ROOT / "benchmarks" / "toy_prior_model"
VARIANTS = {
    "bake": {"texture.refine_steps": "0"},
    # 03d: per-texel correction (= 03c's "refine_white_m1.8" but with the lr decaying to 0)
    "texel_decay": {"texture.refine_correction_size": "256"},
    # 03d: correction at half the render size (32² at 64 px) and the lr decaying: the new default
    "coarse_decay": {},
    "coarse_decay_random": {"texture.refine_background": "random"},
    "coarse_decay_edge4": {"texture.refine_edge_px": "4"},
    "coarse_decay_edge8": {"texture.refine_edge_px": "8"},
    "coarse_decay_edge8_random": {"texture.refine_edge_px": "8", "texture.refine_background": "random"},
    # the defaults of 03d (= coarse_decay_edge8_random) with one knob moved
    "defaults_lr0.1": {"texture.refine_lr": "0.1"},
    "defaults_edge16": {"texture.refine_edge_px": "16"},
    "refine_white": {"texture.refine_background": "white", "texture.refine_margin": "1.1"},  # before
    "refine_white_g100": {"texture.refine_background": "white", "texture.refine_margin": "1.1",
                          "texture.refine_guidance_scale": "100"},
    "refine_random": {"texture.refine_background": "random", "texture.refine_margin": "1.1"},
    "refine_random_g100": {"texture.refine_background": "random", "texture.refine_margin": "1.1",
                           "texture.refine_guidance_scale": "100"},
    "refine_white_m1.8": {"texture.refine_background": "white", "texture.refine_margin": "1.8"},
    "refine_random_m1.8": {"texture.refine_background": "random", "texture.refine_margin": "1.8"},
}

ap = argparse.ArgumentParser()
ap.add_argument("obj")
ap.add_argument("splat", type=Path)
ap.add_argument("out", type=Path)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--variants", default=",".join(VARIANTS))
a = ap.parse_args()
torch.set_num_threads(a.threads)
a.out.mkdir(parents=True, exist_ok=True)
base = {**scaled_sets(_prior_image(MODEL))}
for name in a.variants.split(","):
    sets = {**base, **VARIANTS[name]}
    glb = a.out / f"{a.obj}_{name}.glb"
    cmd = [sys.executable, "-m", "tdgen.cli", "mesh", str(a.splat), "-o", str(glb), "--prompt",
           PROMPTS[a.obj], "--model", str(MODEL), "--device", "cpu", "--seed", "0", "--json"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(json.dumps({"variant": name, "error": proc.stderr[-500:]}), flush=True)
        continue
    cfg = resolve_config("standard", sets)
    row = measure_object(a.obj, glb, a.splat, cfg, "cpu", a.out / f"{a.obj}_{name}.compare.png")
    row.update(variant=name, wall_s=round(time.perf_counter() - t, 1))
    print(json.dumps(row), flush=True)
