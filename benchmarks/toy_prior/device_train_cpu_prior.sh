#!/usr/bin/env bash
# The committed CPU prior (benchmarks/toy_prior_model), trained alone on one GPU with fixed
# steps and seed 0: `bash benchmarks/toy_prior/device_train_cpu_prior.sh` after `. .whl/env.sh`.
set -u
T="$(mktemp -d)"; R="$T/res"; mkdir -p "$R"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
M="python -m benchmarks.toy_prior"
$M data --size cpu --per-object 2500 --seed 0 --out "$T/cpu.npz" --preview "$R/data_cpu.png" 2>&1 | tee "$R/train_cpu.log"
$M train --data "$T/cpu.npz" --size cpu --out "$T/toy_prior_model" --seed 0 --vae-steps ${VAE_STEPS:-800} \
  --vae-batch 64 --unet-steps ${UNET_STEPS:-1800} --batch 512 --lr 1e-3 --max-seconds ${MAX_S:-130} \
  --sheet "$R/samples_cpu.png" --record "$R/train_cpu.json" 2>&1 | tee -a "$R/train_cpu.log"
(cd "$T" && tar cf "$OUT/prior.tar" res toy_prior_model)
