#!/usr/bin/env bash
# Retrain the shipped brain-extraction U-Net from scratch, in the five stages recorded in its model card
# (training.stages): fields of view centred on the brain, then half of them anywhere in the head so
# that the network learns to leave out the face and neck it sees at inference, then the same three times
# at a lower learning rate, the last with aged copies of the heads (thick outer CSF). About 2 h 50 min on
# 2 CPU threads. A rerun resumes each stage from its checkpoint.
#   bash scripts/train-brainmask.sh [ANATOMY_DIR] [OUT_DIR] [extra scanbridge-train options, e.g. --threads 4]
set -euo pipefail
cd "$(dirname "$0")/.."
ANATOMY=${1:-../shared/data/anatomy}
OUT=${2:-runs/brainmask}
shift $(( $# > 2 ? 2 : $# ))
train=(.venv/bin/scanbridge-train brainmask --anatomy-dir "$ANATOMY")
"${train[@]}" --out "$OUT/stage1" --iterations 6000 --batch 2 --seed 0 --stop-after 2000 "$@"
"${train[@]}" --out "$OUT/stage2" --init-from "$OUT/stage1/checkpoint.pt" --iterations 2000 --batch 2 \
    --size 112 --centre head --lr 0.0005 --seed 1 "$@"
"${train[@]}" --out "$OUT/stage3" --init-from "$OUT/stage2/checkpoint.pt" --iterations 700 --batch 2 \
    --size 112 --centre head --lr 0.0002 --seed 2 "$@"
"${train[@]}" --out "$OUT/stage4" --init-from "$OUT/stage3/checkpoint.pt" --iterations 1500 --batch 2 \
    --size 112 --centre head --lr 0.0002 --seed 3 "$@"
"${train[@]}" --out "$OUT/stage5" --init-from "$OUT/stage4/checkpoint.pt" --iterations 1500 --batch 2 \
    --size 112 --centre head --lr 0.0002 --seed 5 --aged 1 "$@"
echo "weights: $OUT/stage5/weights (copy brainmask_unet.pt and .json into bidsapp/models/weights to ship them)"
