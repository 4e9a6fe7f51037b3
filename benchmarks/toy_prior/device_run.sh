#!/usr/bin/env bash
# One GPU session of issue 9 (run from the worktree root on the device, after `. .whl/env.sh`):
# trains the CPU-sized and GPU-sized priors side by side, distils stage 1 from the CPU prior
# (normal / flipped / swapped, guidance 20 and 100) and runs `tdgen make` per object with the
# GPU prior. Everything comes back in $OUT as a few tar files, re-packed after each phase so a
# run cut short still returns what it finished.
set -u
T="$(mktemp -d)"; R="$T/res"; mkdir -p "$R"
log() { echo "[$(date +%T)] $*" | tee -a "$R/log.txt"; }
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
M="python -m benchmarks.toy_prior"
pack() { (cd "$T" && tar cf "$OUT/results.tar" res cpu_prior 2>/dev/null); cp "$R/log.txt" "$OUT/log.txt"; }

log "start $(python -c 'import torch;print(torch.cuda.get_device_name())')"
( sleep ${PACK_AT:-370}; log "late pack"; pack ) &  # before the call's time limit kills us
( python -c "from gsplat.cuda._backend import _C" > "$R/gsplat_build.txt" 2>&1; echo "gsplat rc=$?" >> "$R/gsplat_build.txt" ) &
GS=$!
( $M data --size cpu ${OBJS:+--objects ${OBJS// /,}} --per-object ${PER_OBJ:-2500} --out "$T/cpu.npz" --preview "$R/data_cpu.png" \
  && $M train --data "$T/cpu.npz" --size cpu --out "$T/cpu_prior" --vae-steps ${VAE_STEPS:-1500} \
     --unet-steps ${CPU_STEPS:-4000} --batch ${CPU_BATCH:-512} --max-seconds ${CPU_SECONDS:-120} --sheet "$R/samples_cpu.png" --record "$R/train_cpu.json" ) > "$R/train_cpu.log" 2>&1 &
CP=$!
( $M data --size gpu ${OBJS:+--objects ${OBJS// /,}} --per-object ${PER_OBJ:-3000} --out "$T/gpu.npz" --preview "$R/data_gpu.png" \
  && $M train --data "$T/gpu.npz" --size gpu --out "$T/gpu_prior" --vae-steps ${VAE_STEPS:-1500} \
     --unet-steps ${GPU_STEPS:-3000} --batch ${GPU_BATCH:-256} --max-seconds ${GPU_SECONDS:-150} --sheet "$R/samples_gpu.png" --record "$R/train_gpu.json" ) > "$R/train_gpu.log" 2>&1 &
GP=$!
wait $GS; log "gsplat: $(tail -1 $R/gsplat_build.txt)"
wait $CP; log "cpu prior rc=$?"; pack
S1=()
for o in ${OBJS:-chair car boot mug}; do
  $M stage1 --model "$T/cpu_prior" --objects $o --modes normal,flipped,swapped --images "$R" ${S1_SET:+--set "$S1_SET"} \
     --json-out "$R/stage1_g20_$o.json" > "$R/stage1_g20_$o.log" 2>&1 & S1+=($!)
  $M stage1 --model "$T/cpu_prior" --objects $o --modes normal --set "$(python -c "import json,sys;print(json.dumps({**json.loads(sys.argv[1] or '{}'),'guidance_scale':100}))" "${S1_SET:-}")" \
     --json-out "$R/stage1_g100_$o.json" > "$R/stage1_g100_$o.log" 2>&1 & S1+=($!)
done
wait $GP; log "gpu prior rc=$?"
(cd "$T" && tar cf - gpu_prior | split -b 15M - "$OUT/gpu_prior.tar.part-")
EV=()
for o in ${OBJS:-chair car boot mug}; do
  for c in default:{} g20:'{"stage1.guidance_scale":20}' norefine:'{"texture.refine_steps":0}'; do
    n=${c%%:*}; s=${c#*:}; [ -n "${EVAL_SET:-}" ] && s=$(python -c "import json,sys;print(json.dumps({**json.loads(sys.argv[1]),**json.loads(sys.argv[2])}))" "$s" "$EVAL_SET")
    OMP_NUM_THREADS=1 timeout ${EVAL_TIMEOUT:-200} $M eval --model "$T/gpu_prior" --objects $o --workdir "$T/ev_$n" --set "$s" \
       --json-out "$R/eval_${n}_$o.json" > "$R/eval_${n}_$o.log" 2>&1 & EV+=($!)
  done
done
wait "${S1[@]}"; log "stage1 done"; pack
wait "${EV[@]}"; log "eval done"
for n in default g20 norefine; do
  python -c "import sys;from pathlib import Path;from benchmarks.toy_prior.make_eval import contact_sheet as c;c(Path(sys.argv[1]))" "$T/ev_$n"
  cp "$T/ev_$n/contact.png" "$R/contact_$n.png" 2>/dev/null
  for f in "$T"/ev_$n/*.compare.png; do [ -e "$f" ] && cp "$f" "$R/${n}_$(basename $f)"; done; done
pack; log "end"; pack
