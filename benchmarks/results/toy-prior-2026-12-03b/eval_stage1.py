"""CI-sized stage 1 (toy_prior.evaluate.stage1_config(steps=200, num_points=800, max_points=2000),
CPU, torch backend) for objects × seeds on the committed prior, with Stage1Config overrides: one
JSON line per run and a result sheet per run (reference on top, splats below, 8 held-out views).

    python eval_stage1.py OUT_PREFIX [--set '{"sds_space": "image"}'] [--seeds 0,1,2]
                          [--objects mug,chair,car,boot] [--threads 1]
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.toy_prior.evaluate import load_prior, stage1_config, stage1_recovery  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--set", default="{}", help="Stage1Config overrides as JSON")
ap.add_argument("--seeds", default="0,1,2")
ap.add_argument("--objects", default="mug,chair,car,boot")
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
prior = load_prior(ROOT / "benchmarks" / "toy_prior_model", "cpu")
overrides = json.loads(a.set)
out = Path(a.out)
out.parent.mkdir(parents=True, exist_ok=True)
with open(f"{out}.jsonl", "a") as f:
    for seed in [int(s) for s in a.seeds.split(",")]:
        for obj in a.objects.split(","):
            torch.manual_seed(seed)
            cfg = stage1_config(steps=200, num_points=800, max_points=2000, **overrides)
            r = stage1_recovery(prior, obj, cfg, seed=seed, backend="torch",
                                images=Path(f"{out}_{obj}_s{seed}.png"))
            r.update(seed=seed, set=overrides)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(json.dumps(r), flush=True)
