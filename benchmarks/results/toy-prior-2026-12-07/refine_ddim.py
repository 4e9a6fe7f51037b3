"""Issue 10 lever, judged on the toy prior (issue 9): refinement's img2img with a 25-step DDIM
schedule instead of 50 at the same SDEdit strengths (half the UNet calls: 5 → 2 denoising steps
per refinement step instead of 10 → 3). One stage-1 splat per object from this folder's defaults
eval, meshed and textured again by `tdgen mesh SPLAT --prompt` per variant and refinement seed;
each .glb measured as `toy_prior eval` measures it (colour error where both silhouettes overlap).

    python refine_ddim.py OBJ SPLAT.ply OUTDIR [--seeds 0,1] [--variants bake,ddim50,ddim25]
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
    "ddim50": {},  # the defaults
    "ddim25": {"texture.refine_ddim_steps": "25"},
}

ap = argparse.ArgumentParser()
ap.add_argument("obj")
ap.add_argument("splat", type=Path)
ap.add_argument("out", type=Path)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--seeds", default="0,1")
ap.add_argument("--variants", default=",".join(VARIANTS))
a = ap.parse_args()
torch.set_num_threads(a.threads)
a.out.mkdir(parents=True, exist_ok=True)
base = {**scaled_sets(_prior_image(MODEL))}
for name in a.variants.split(","):
    for seed in ([0] if name == "bake" else [int(s) for s in a.seeds.split(",")]):
        sets = {**base, **VARIANTS[name]}
        glb = a.out / f"{a.obj}_{name}_s{seed}.glb"
        cmd = [sys.executable, "-m", "tdgen.cli", "mesh", str(a.splat), "-o", str(glb), "--prompt",
               PROMPTS[a.obj], "--model", str(MODEL), "--device", "cpu", "--seed", str(seed),
               "--json"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": str(a.threads)})
        if proc.returncode:
            print(json.dumps({"object": a.obj, "variant": name, "seed": seed,
                              "error": proc.stderr[-500:]}), flush=True)
            continue
        cfg = resolve_config("standard", sets)
        row = measure_object(a.obj, glb, Path("/nonexistent.ply"), cfg, "cpu",
                             a.out / f"{a.obj}_{name}_s{seed}.compare.png")
        res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        print(json.dumps({"variant": name, "seed": seed, **row,
                          "refine_s": res["timings"].get("refine"),
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
