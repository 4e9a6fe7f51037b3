#!/usr/bin/env bash
# The committed CPU prior (benchmarks/toy_prior_model), trained alone on one GPU with seed 0:
# `bash benchmarks/toy_prior/device_train_cpu_prior.sh` after `. .whl/env.sh`. The committed run
# (2026-12-02, H200, 470 s) stopped on its time cap at UNet step 5122 of a 6000-step schedule;
# --unet-stop replays that stop so the learning-rate schedule is the same.
set -u
T="$(mktemp -d)"; R="$T/res"; mkdir -p "$R"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
M="python -m benchmarks.toy_prior"
$M data --size cpu --per-object 2500 --seed 0 --out "$T/cpu.npz" --preview "$R/data_cpu.png" 2>&1 | tee "$R/train_cpu.log"
$M train --data "$T/cpu.npz" --size cpu --out "$T/toy_prior_model" --seed 0 --vae-steps ${VAE_STEPS:-1500} \
  --vae-batch 64 --unet-steps ${UNET_STEPS:-6000} --unet-stop ${UNET_STOP:-5122} --batch 512 --lr 1e-3 \
  --max-seconds ${MAX_S:-1200} --sheet "$R/samples_cpu.png" --record "$R/train_cpu.json" 2>&1 | tee -a "$R/train_cpu.log"
(cd "$T" && tar cf "$OUT/prior.tar" res toy_prior_model)
