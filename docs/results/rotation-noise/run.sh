#!/usr/bin/env bash
# Where does the rotation score's spread between seeds come from: the probe, or the trained
# backbone? Train models under two training seeds, probe each checkpoint with three probe
# seeds. Writes docs/results/rotation-noise/<model>-train<seed>-probe<seed>/eval.json.
# Usage (from the repository root): bash docs/results/rotation-noise/run.sh [runs-dir]
set -euo pipefail
here=docs/results/rotation-noise
runs=${1:-runs/rotation-noise}
train() {  # name, training seed, extra --set arguments...
  local name=$1 seed=$2
  shift 2
  selfaugment pretrain -f "$here/pretrain.yaml" -o "$runs/$name-train$seed" \
      --set runtime.seed="$seed" "$@"
  for probe_seed in 0 1 2; do
    selfaugment eval -f "$here/eval.yaml" --checkpoint "$runs/$name-train$seed/checkpoint.pt" \
        --set runtime.seed="$probe_seed" -o "$here/$name-train$seed-probe$probe_seed"
    rm -f "$here/$name-train$seed-probe$probe_seed/probe_heads.pt"
  done
}
for seed in 0 2; do
  train crop-flip "$seed"
  train equalize "$seed" --set augment.base=Equalize --set augment.crop=false \
      --set augment.flip=false
done
