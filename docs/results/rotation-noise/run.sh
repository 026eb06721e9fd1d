#!/usr/bin/env bash
# Where does the rotation score's spread between seeds come from: the probe, or the trained
# backbone? And does it shrink with more training or a wider network?
#  1. crop+flip and Equalize-only models under training seeds 0 and 2, each checkpoint probed
#     with probe seeds 0, 1, 2;
#  2. crop+flip with 24 epochs instead of 12, and with a width-16 network, training seeds
#     0, 1, 2, probe seed 0;
#  3. crop+flip, training and probe seed 2, on one thread, as the study's workers train
#     (`selfaugment pretrain` uses all cores: 2 on the machine of docs/results/).
# Writes docs/results/rotation-noise/<model>-train<seed>-probe<seed>/eval.json; a finished
# checkpoint or eval.json is not redone.
# Usage (from the repository root): bash docs/results/rotation-noise/run.sh [runs-dir]
set -euo pipefail
here=docs/results/rotation-noise
runs=${1:-runs/rotation-noise}
train() {  # name, training seed, probe seeds ("0 1 2"), extra --set arguments...
  local name=$1 seed=$2 probe_seeds=$3
  shift 3
  selfaugment pretrain -f "$here/pretrain.yaml" -o "$runs/$name-train$seed" \
      --set runtime.seed="$seed" "$@"
  for probe_seed in $probe_seeds; do
    local out="$here/$name-train$seed-probe$probe_seed"
    [[ -f $out/eval.json ]] && continue
    selfaugment eval -f "$here/eval.yaml" --checkpoint "$runs/$name-train$seed/checkpoint.pt" \
        --set runtime.seed="$probe_seed" -o "$out"
    rm -f "$out/probe_heads.pt"
  done
}
for seed in 0 2; do
  train crop-flip "$seed" "0 1 2"
  train equalize "$seed" "0 1 2" --set augment.base=Equalize --set augment.crop=false \
      --set augment.flip=false
done
for seed in 0 1 2; do
  train crop-flip-24-epochs "$seed" 0 --set optim.epochs=24
  train crop-flip-width-16 "$seed" 0 --set model.width=16
done
(
  export OMP_NUM_THREADS=1
  train crop-flip-1-thread 2 2
)
