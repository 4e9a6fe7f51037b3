# Run on the GPU machine as: . .whl/env.sh && bash benchmarks/device_profile_batch.sh
# (prepared 2026-12-07; no device was lent that session, so it has not run yet)
# Issue 10: a profile of the pipeline's own warm stage-1 loop (CPU and CUDA), then batch throughput
# at `standard` in one process and in two worker processes on the same GPU (--gpus 0,0).
set -u
nvidia-smi -L
export TDGEN_CACHE_DIR=/tmp/tdgen-cache
W=/tmp/w; mkdir -p $W
t0=$(date +%s); python -c "from gsplat.cuda._backend import _C" > $W/gsplat_build.log 2>&1; echo "gsplat build rc=$? $(( $(date +%s) - t0 )) s"
timeout 230 python benchmarks/profile_stage1.py --device cuda --json-out $W/profile.json --trace $W/trace.json.gz > $W/profile.out 2> $W/profile.log; echo "profile rc=$? $(( $(date +%s) - t0 )) s"
tail -n 4 $W/profile.log
python - <<'P'
import json
r = json.load(open("/tmp/w/profile.json"))
print("stage1", round(r["stage1_s"], 2), "warm-up", round(r["warmup_stage1_s"], 1))
for k, v in r["phases"].items(): print(k, {a: round(b, 2) for a, b in v.items()})
for w in r["windows"]:
    print("window", w["window"], json.dumps(w["trace"]))
    for k, v in sorted(w["labels"].items()): print("  ", k, {a: round(b, 2) for a, b in v.items()})
    for row in w["top_cpu"][:12]: print("   cpu", round(row["self_cpu_ms_per_step"], 3), row["calls_per_step"], row["name"])
    for row in w["top_gpu"][:12]: print("   gpu", round(row["gpu_ms_per_step"], 3), row["calls_per_step"], row["name"])
P
python -c "
import sys, torch; sys.path.insert(0, '.')
from pathlib import Path
from benchmarks.batch_speed import write_full_model
write_full_model(Path('/tmp/model'), torch.float16)" > $W/write.log 2>&1; echo "model written rc=$? $(( $(date +%s) - t0 )) s"
timeout 150 python benchmarks/batch_speed.py --preset standard --n 6 --model-dir /tmp/model --json-out $W/batch_1proc.json > $W/batch_1proc.log 2>&1; echo "batch 1 proc rc=$? $(( $(date +%s) - t0 )) s"
timeout 130 python benchmarks/batch_speed.py --preset standard --n 6 --gpus 0,0 --model-dir /tmp/model --json-out $W/batch_2proc.json > $W/batch_2proc.log 2>&1; echo "batch 2 proc rc=$? $(( $(date +%s) - t0 )) s"
for f in $W/batch_*.json; do echo $f; cat $f; done
tail -n 5 $W/batch_2proc.log
cp $W/*.json $W/*.log $W/*.out $OUT/ 2>/dev/null; cp $W/trace_*.json.gz $OUT/ 2>/dev/null
ls -la $OUT
echo "all elapsed $(( $(date +%s) - t0 )) s"
