#!/usr/bin/env bash
# Retrain the shipped tissue U-Nets (physics-aware and its no-physics ablation) from scratch: the
# eleven stages recorded in bidsapp/models/weights/tissue_unet*.json, in order, each continuing from
# the previous one's weights. Stages 1-3 train the ablation alone (the physics model starts from it at
# stage 4; alone or beside the physics model it ends bit for bit the same). Pass --no-ablation to
# train stages 4-10 for the physics model only (the ablation is needed for the benchmark, not the app);
# --short for the two-stage recipe that fits in two hours on 2 CPU threads instead of the eleven stages;
# --device cuda to use a GPU. On a CPU add --sampling patch (only each patch is simulated: stages 1-9
# of the physics model in 76 min measured on 2 threads, of both networks in 2.3 h; stage 10 of both 35 min). A rerun
# into the same OUT_DIR resumes at the first unfinished stage (with the same flags but for --threads
# and --device; others need a new OUT_DIR). Times and figures of every recipe are in docs/notebook/tissue-models.md.
#
#   bash scripts/train-tissue.sh [ANATOMY_DIR] [OUT_DIR] [--no-ablation] [--short] [extra scanbridge-train flags...]
#   bash scripts/train-tissue.sh ../shared/data/anatomy runs/tissue --no-ablation --sampling patch --threads 2
#
# ANATOMY_DIR holds the label maps anat-01..anat-12 (anat-10..12 are held out); the final weights
# and cards land in OUT_DIR/stage11/weights (copy them into bidsapp/models/weights/ to ship them).
set -euo pipefail
cd "$(dirname "$0")/.."
ANAT="${1:-../shared/data/anatomy}"
OUT="${2:-runs/tissue}"
shift $(( $# > 2 ? 2 : $# ))
MODELS=--both
SHORT=0
EXTRA=()
for a in "$@"; do
    case "$a" in
        --no-ablation) MODELS=--physics ;;
        --short) SHORT=1 ;;
        *) EXTRA+=("$a") ;;
    esac
done
TRAIN=(scanbridge-train tissue --deformations 2 --resolution 2 --patch 32 --batch 4
       --features "8,16,32,64" --anatomy-dir "$ANAT" --cache "$OUT/cache" ${EXTRA[@]+"${EXTRA[@]}"})
command -v scanbridge-train >/dev/null || { bash scripts/setup.sh; export PATH="$PWD/.venv/bin:$PATH"; }
BASE=("${TRAIN[@]}" --no-physics)
TRAIN+=("$MODELS")

# the recipe of a stage's command: all but where it runs (--threads, --device)
recipe() { printf '%s\n' "$1" | sed -E 's/ --(threads|device) [^ ]+//g'; }

# stage NAME COMMAND...: run one stage into OUT/NAME unless a previous run of this script finished it
# with the same recipe (a rerun with the same OUT_DIR resumes at the first unfinished stage, on any
# --threads or --device; other flags stop the script instead of mixing two recipes in one chain)
stage() {
    local name=$1
    shift
    local cmd="$* --out $OUT/$name --weights-dir $OUT/$name/weights"
    if [ -f "$OUT/$name/done" ]; then
        if [ "$(recipe "$(cat "$OUT/$name/done")")" != "$(recipe "$cmd")" ]; then
            echo "train-tissue.sh: $OUT/$name was trained with other flags (see $OUT/$name/done):" \
                "give a new OUT_DIR" >&2
            exit 2
        fi
        echo "$name: finished by an earlier run, skipped"
        return
    fi
    "$@" --out "$OUT/$name" --weights-dir "$OUT/$name/weights"
    mkdir -p "$OUT/$name"
    printf '%s\n' "$cmd" > "$OUT/$name/done.tmp" && mv "$OUT/$name/done.tmp" "$OUT/$name/done"
}

if [ "$SHORT" = 1 ]; then
    # the ablation from scratch with the paired consistency loss, then stage 9's losses for the physics
    # model started from it (and the ablation continued on the same batches)
    stage short1 "${BASE[@]}" --seed 10 --iterations 4000 --lr 0.002 \
        --consistency 1 --orientation RAS
    stage short2 "${TRAIN[@]}" --seed 11 --iterations 6000 --lr 0.0005 \
        --consistency 1 --physics-injection norm_shift --physics-from-base --low-contrast 0.25 --volume-consistency 1 \
        --randomise 0.7 --orientation RAS --init-from "$OUT/short1/weights"
    echo "weights and cards: $OUT/short2/weights"
    exit 0
fi

# 1: the ablation from scratch
stage stage1 "${BASE[@]}" --seed 0 --iterations 2000 --lr 0.002
# 2: continued with a new seed (new batches) and a lower peak learning rate
stage stage2 "${BASE[@]}" --seed 1 --iterations 2000 --lr 0.001 \
    --init-from "$OUT/stage1/weights"
# 3: paired consistency loss; the shipped chain used the checkpoint at 2700 of a 4000-iteration schedule
stage stage3 "${BASE[@]}" --seed 2 --iterations 4000 --stop-after 2700 \
    --lr 0.001 --consistency 1 --init-from "$OUT/stage2/weights"
# 4: the physics model starts as the stage-3 ablation with a zero physics injection (norm_shift);
#    the ablation continues on the same batches, so both end with the same training budget (--both)
stage stage4 "${TRAIN[@]}" --seed 3 --iterations 2000 --lr 0.0005 \
    --consistency 1 --physics-injection norm_shift --physics-from-base --init-from "$OUT/stage3/weights"
# 5: both networks continue 3000 iterations at a lower learning rate (same losses as stage 4)
stage stage5 "${TRAIN[@]}" --seed 4 --iterations 3000 --lr 0.0003 \
    --consistency 1 --physics-injection norm_shift --init-from "$OUT/stage4/weights"
# 6: as stage 5 with a new seed
stage stage6 "${TRAIN[@]}" --seed 5 --iterations 3000 --lr 0.0003 \
    --consistency 1 --physics-injection norm_shift --init-from "$OUT/stage5/weights"
# 7: a new seed at a lower peak learning rate (0.0002)
stage stage7 "${TRAIN[@]}" --seed 6 --iterations 3000 --lr 0.0002 \
    --consistency 1 --physics-injection norm_shift --init-from "$OUT/stage6/weights"
# 8: as stage 7, with a quarter of the SPGR samples drawn among settings of almost no GM/WM contrast
stage stage8 "${TRAIN[@]}" --seed 7 --iterations 3000 --lr 0.0002 \
    --consistency 1 --physics-injection norm_shift --low-contrast 0.25 --init-from "$OUT/stage7/weights"
# 9: as stage 8 with a new seed and a paired volume-consistency term (relative soft-volume difference
#    per class between two acquisitions of the same patch)
stage stage9 "${TRAIN[@]}" --seed 8 --iterations 3000 --lr 0.0002 \
    --consistency 1 --physics-injection norm_shift --low-contrast 0.25 --volume-consistency 1 \
    --init-from "$OUT/stage8/weights"
# 10: the brains in RAS, the voxel order the participant workflow hands the models (stages 1-9 saw the
#     label maps' LIA), and 70 % of the samples domain-randomised (--randomise), stage 9's losses
stage stage10 "${TRAIN[@]}" --seed 12 --iterations 2800 --lr 0.0005 \
    --consistency 1 --physics-injection norm_shift --low-contrast 0.25 --volume-consistency 1 \
    --randomise 0.7 --orientation RAS --init-from "$OUT/stage9/weights"
# 11: labelled with the label maps' tissue fractions instead of the R1 gold standard (which at 2 mm
#     calls partial-volume voxels grey: GM 13 % above the true volume before any network error)
stage stage11 "${TRAIN[@]}" --seed 13 --iterations 1200 --lr 0.0003 \
    --consistency 1 --physics-injection norm_shift --low-contrast 0.25 --volume-consistency 1 \
    --randomise 0.7 --orientation RAS --target fractions --init-from "$OUT/stage10/weights"
echo "weights and cards: $OUT/stage11/weights"
