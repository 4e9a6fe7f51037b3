"""When does the toy mug (seed 1, project defaults at 64 px) turn into a frame-filling fog?
Records, on black-background steps, the render's coverage (pixels brighter than 0.1) and the
image-space target's coverage, through the real `tdgen make` stage-1 path (generate → .ply)."""
import sys, json
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from benchmarks.toy_prior.make_eval import scaled_sets
from benchmarks.toy_prior.objects import PROMPTS
from tdgen.config import resolve_config
import tdgen.guidance as G
from tdgen.pipeline import generate

obj, seed = sys.argv[1], int(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
out = Path(sys.argv[4] if len(sys.argv) > 4 else f"/tmp/fog/{obj}_s{seed}.ply")
sets = {**scaled_sets(64), **{k: str(v) for k, v in extra.items()}, "model.id": "/work/main/benchmarks/toy_prior_model", "seed": str(seed)}
cfg = resolve_config("standard", sets)
rec = []
orig = G.SDSGuidance.loss
def loss(self, images, cams, backgrounds, progress):
    l = orig(self, images, cams, backgrounds, progress)
    bg = float(backgrounds[0, 0])
    x = images.detach().clamp(0, 1)
    row = {"p": round(progress, 3), "bg": bg, "t": int(self.last_t[0]),
           "mean": round(float(x.mean()), 3)}
    if bg == 0.0:
        row["cover"] = round(float((x.max(1).values > 0.1).float().mean()), 3)
        if self.cfg.sds_space == "image" and progress >= self.cfg.sds_image_start and self.last_target is not None:
            tg = self.last_target.detach()
            row["tcover"] = round(float((tg.max(1).values > 0.1).float().mean()), 3)
    rec.append(row)
    return l
G.SDSGuidance.loss = loss
generate(PROMPTS[obj], cfg, out, device="cpu")
Path(str(out) + ".jsonl").write_text("\n".join(json.dumps(r) for r in rec) + "\n")
import statistics
for a in range(0, 100, 10):
    rows = [r for r in rec if a / 100 <= r["p"] < (a + 10) / 100 and "cover" in r]
    tc = [r["tcover"] for r in rows if "tcover" in r]
    print(f"{a:3d}%  render cover {statistics.mean(r['cover'] for r in rows):.3f}  target cover {statistics.mean(tc) if tc else float('nan'):.3f}  t {rows[0]['t'] if rows else '-'}")
