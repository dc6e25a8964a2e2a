#!/usr/bin/env bash
# The full-resolution GPU recipe on the 32 shared Carvana cars (28 train, 4 held out by id), timed, then
# scored at 1280x1918 with and without flip TTA and one-region post-processing. One command for a lent H200:
#
#   here, once:  mkdir -p data/shared-carvana && cp -r ../shared/carvana/train ../shared/carvana/train_masks \
#                    data/shared-carvana/        # 54 MB, inside data/ which git ignores
#                ../shared/device/wheels.sh      # albumentations' wheels into .whl/
#   there:       bash benchmarks/gpu_recipe.sh data/shared-carvana    (carry .whl and data/shared-carvana)
#
# Knobs (environment): MINUTES (10: the training budget; benchmarks/recipe_epochs.py times a few steps first and
# picks the epochs that fit it), EPOCHS (instead of MINUTES: a fixed count), BATCH (4), CROP (none; e.g. 640x960 for
# a GPU of 8-16 GB), OUT (./gpu-recipe), RUN (/tmp/gpu-recipe-run: the run folder), and for a CPU smoke run of the
# script: SIZE (1280x1918), FEATURES ("32 64 128 256 512 1024"), DEVICE (auto).
# On a lent H200, whose commands stop after 10 minutes, one call (carry .whl and data/shared-carvana) fitted
# MINUTES=6 (6.9 minutes from launch to the scores) after the check of the full-size training step that issue 13 asks
# to keep (2026-12-04: 0.9940, 0.9942 with TTA; BENCHMARKS.md, "The GPU recipe on an H200"):
#   source benchmarks/gpu_wheels.sh; python3 benchmarks/bench_train.py --device cuda --height 1280 --width 1918 \
#     --batch-size 4 --images 0 --pairs 1 --steps 5 --warmup 3 2>&1 | tee "$OUT/step.md";
#   OUT=$OUT MINUTES=6 bash benchmarks/gpu_recipe.sh data/shared-carvana
# 640x960 reached the same Dice per epoch at 3.4x the speed, so the next lent GPU runs that for longer:
#   OUT=$OUT SIZE=640x960 MINUTES=7 bash benchmarks/gpu_recipe.sh data/shared-carvana   # about 9 minutes in all
# Results in $OUT: train.log, evaluate.log, metrics.csv, per_image.csv, recipe.md (time, memory, Dice, and the
# time of an epoch of the full Kaggle training set, estimated from the measured images per second).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: gpu_recipe.sh DATA_DIR}
OUT=${OUT:-./gpu-recipe}
mkdir -p "$OUT"
source benchmarks/gpu_wheels.sh  # albumentations from the carried wheels, where the image lacks it
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
RUN=${RUN:-/tmp/gpu-recipe-run}  # the run folder, outside OUT: its 1.5 GB checkpoints need not come back
rm -rf "$RUN"
# The recipe: full resolution, 6 levels so the deepest sees the whole car (the first-place U-Net's depth),
# the outline weighted 3x, batch 4.
SIZE=${SIZE:-1280x1918}
read -r -a FEATURES <<< "${FEATURES:-32 64 128 256 512 1024}"
RECIPE=(--height "${SIZE%x*}" --width "${SIZE#*x}" --features "${FEATURES[@]}" --batch-size "${BATCH:-4}"
        --lr 1e-3 --edge-weight 3 --val-cars 4 ${CROP:+--crop "$CROP"})
if [ -z "${EPOCHS:-}" ]; then  # as many as fit MINUTES at the rate of a few measured steps
  EPOCHS=$(python3 benchmarks/recipe_epochs.py --minutes "${MINUTES:-10}" -- --data-dir "$DATA" "${RECIPE[@]}" \
    --device "${DEVICE:-auto}" 2> >(tee "$OUT/probe.log" >&2) | tail -1)
fi
RECIPE+=(--epochs "$EPOCHS")
echo "python train.py --data-dir $DATA ${RECIPE[*]}" > "$OUT/recipe.md"
start=$(date +%s)
python3 train.py --data-dir "$DATA" "${RECIPE[@]}" --num-predictions 0 --device "${DEVICE:-auto}" \
  --out-dir "$RUN" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s' | tee "$OUT/train.log"
wall=$(( $(date +%s) - start ))
python3 evaluate.py --checkpoint "$RUN/best.pt" --data-dir "$DATA" --tta --device "${DEVICE:-auto}" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s' \
  | tee "$OUT/evaluate.log"
cp "$RUN/metrics.csv" "$RUN/per_image.csv" "$OUT/"
python3 - "$RUN/metrics.csv" "$wall" "$OUT/train.log" >> "$OUT/recipe.md" <<'PY'
import csv, re, sys
rows = list(csv.DictReader(open(sys.argv[1])))
images = int(re.search(r"(\d+) images? \(.*?\) for training", open(sys.argv[3]).read()).group(1))
seconds = [float(r["seconds"]) for r in rows]
later = seconds[1:] or seconds  # the first epoch also decodes every photo
steady = sorted(later)[len(later) // 2]
print(f"epochs {len(rows)}, training {sum(seconds) / 60:.1f} min (wall clock with start-up and the final "
      f"scoring {int(sys.argv[2]) / 60:.1f} min), median epoch {steady:.1f} s = {images / steady:.1f} img/s "
      f"({images} training images, validation included)")
epoch = 4064 / (images / steady) / 60  # --val-cars 0.2 holds out 64 of the 318 cars: 4064 of 5088 photos train
full_epochs = max(1, round(len(rows) * images / 4064))  # as many steps as this run
print(f"full Kaggle training set, 4064 of its 5088 photos trained on: about {epoch:.1f} min an epoch, "
      f"{full_epochs * epoch:.0f} min for {full_epochs} epochs, as many steps as this run's {len(rows)} "
      f"(validating 1024 photos each epoch is extra)")
PY
cat "$OUT/recipe.md"
