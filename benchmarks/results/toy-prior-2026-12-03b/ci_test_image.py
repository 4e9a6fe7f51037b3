"""tests/test_toy_prior.py's three stage-1 runs (mug, seed 0, the CI config: normal, flipped SDS
sign, swapped view prompts) with Stage1Config overrides, judged by the test's own thresholds.

    python ci_test_image.py '{"sds_space": "image", "sds_image_start": 0.3}'
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks.toy_prior.evaluate import load_prior, stage1_config, stage1_recovery  # noqa: E402
from tests.test_toy_prior import CI_STAGE1, IOU_MIN, OBJECT, PRIOR, recovered  # noqa: E402

torch.set_num_threads(1)
over = json.loads(sys.argv[1])
prior = load_prior(PRIOR, "cpu")
res = {}
for mode in ("normal", "flipped", "swapped"):
    torch.manual_seed(0)
    res[mode] = stage1_recovery(prior, OBJECT, stage1_config(**CI_STAGE1, **over), seed=0,
                                mode=mode, backend="torch")
    print(json.dumps({"set": over, **res[mode]}), flush=True)
n, f, s = res["normal"], res["flipped"], res["swapped"]
passes = {"normal": recovered(n) and n["nan_steps"] == 0,
          "flipped": not recovered(f) and f["iou"] < IOU_MIN - 0.2,
          "swapped": not recovered(s) and s["iou_turned"] > s["iou"]}
print(json.dumps({"set": over, "test_passes": passes}))
