#!/usr/bin/env bash
# The CPU recipe on the 32 shared Carvana cars (28 train, 4 held out by id), in two stages of progressive
# resizing, then scored at 1918x1280 with and without flip TTA and one-region post-processing:
#
#   bash benchmarks/cpu_recipe.sh ../shared/carvana [RUNS_DIR]       # RUNS_DIR default runs/carvana-cpu
#
# A five-level UNet (its 12x18 bottleneck at 384x576 sees the whole car). Stage 1 learns the car at 256x384 (about
# 45 s an epoch on a 2-core Zen 4 with bf16 units); stage 2 starts from its weights and split (--init) and sharpens
# the outline at 384x576, where a pixel is 3.3 photo pixels, not 5, with the outline weighted 5x. The held-out cars
# are scored with the model's inputs at 384x576, 448x672 and 512x768, their probabilities averaged (multi-scale TTA).
# Knobs (environment), for the ablation in BENCHMARKS.md: EPOCHS1 (16), EPOCHS2 (9), LR1 (1.5e-3), LR2 (5e-4),
# EDGE (5: --edge-weight of stage 2), AUG2 (stage 2's augmentation flags, e.g. the first place's "--shift 0.0625
# --zoom 0.91 1.21 --rotate 7 --grey 0.1"; default none: train.py's ranges), FEATURES ("16 32 64 128 256"), SIZES
# (evaluate.py --size), EXTRA (more train.py flags for both stages). Both stages use --seed 0, whose split holds out
# 4 cars.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: cpu_recipe.sh DATA_DIR [RUNS_DIR]}
R=${2:-runs/carvana-cpu}
mkdir -p "$R"
# shellcheck disable=SC2206
COMMON=(--data-dir "$DATA" --features ${FEATURES:-16 32 64 128 256} --batch-size 2 --val-cars 4 --workers 1
  --num-predictions 0)
# shellcheck disable=SC2086
python train.py "${COMMON[@]}" --height 256 --width 384 --epochs "${EPOCHS1:-16}" --lr "${LR1:-1.5e-3}" \
  ${EXTRA:-} --out-dir "$R/stage1" 2>&1 | tr '\r' '\n' | grep -v 'it/s' > "$R.stage1.log"
# shellcheck disable=SC2086
python train.py "${COMMON[@]}" --height 384 --width 576 --epochs "${EPOCHS2:-9}" --lr "${LR2:-5e-4}" --fp32-warmup 0 \
  --edge-weight "${EDGE:-5}" ${AUG2:-} ${EXTRA:-} --init "$R/stage1/last.pt" --out-dir "$R/stage2" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s' > "$R.stage2.log"
# shellcheck disable=SC2086
python evaluate.py --checkpoint "$R/stage2/best.pt" --data-dir "$DATA" --tta --workers 1 \
  --size ${SIZES:-384x576 448x672 512x768} 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$R.evaluate.log"
python - "$R/stage1/metrics.csv" "$R/stage2/metrics.csv" <<'PY'
import csv, sys
minutes = [sum(float(r["seconds"]) for r in csv.DictReader(open(path))) / 60 for path in sys.argv[1:]]
print(f"training: {minutes[0]:.1f} + {minutes[1]:.1f} = {sum(minutes):.1f} min (epoch times in metrics.csv)")
PY
