#!/usr/bin/env bash
# The CPU recipe on the 32 shared Carvana cars (28 train, 4 held out by id), in two stages of progressive
# resizing, then scored at 1918x1280 with and without flip TTA and one-region post-processing:
#
#   bash benchmarks/cpu_recipe.sh ../shared/carvana [RUNS_DIR]       # RUNS_DIR default runs/carvana-cpu
#
# A UNet deep enough that its bottleneck sees the whole car (five levels: 12x18 at 384x576). Stage 1 learns the car
# at SIZE1; stage 2 starts from its weights and split (--init) and sharpens the outline at SIZE2 with the outline
# weighted 5x. The held-out cars are scored with the model's inputs at three sizes, their probabilities averaged
# (multi-scale TTA).
# The model, epochs and sizes follow the CPU class (CPU_CLASS, as utils.cpu_has_bf16_units finds it), to fit 30 min:
#   bf16: bf16 units (bf16 autocast): 16 epochs at 256x384 (about 45 s each on a 2-core Zen 4), then 9 at 384x576,
#         where a pixel is 3.3 photo pixels, not 5; scored at 384x576 448x672 512x768.
#         A slower bf16 CPU (a 2-core Intel Xeon with AMX: about 50 min) fits SIZE1=160x240 EPOCHS1=8 EPOCHS2=7.
#   avx2: AVX2 only (fp32): six levels half as wide (8..256), whose fp32 step costs 2-3x less than five levels':
#         8 epochs at 192x288, then 6 at 384x576 (about 23 min on a 2-core Zen 2, estimated from an emulation);
#         scored at bf16's inputs. The Zen 2's measured schedule before it (22.2 min, 0.9894):
#         FEATURES="16 32 64 128 256" SIZE1=160x240 EPOCHS1=7 SIZE2=320x480 EPOCHS2=3 SIZES="320x480 384x576 416x624".
# Knobs (environment), for the ablation in BENCHMARKS.md: CPU_CLASS (bf16 or avx2), EPOCHS1, EPOCHS2, SIZE1, SIZE2
# (HxW), LR1 (1.5e-3), LR2 (5e-4), EDGE (5: --edge-weight of stage 2), AUG2 (stage 2's augmentation flags, e.g. the
# first place's "--shift 0.0625 --zoom 0.91 1.21 --rotate 7 --grey 0.1"; default none: train.py's ranges), FEATURES
# (the class's UNet), SIZES (evaluate.py --size), EXTRA (more train.py flags for both stages). Both stages use
# --seed 0, whose split holds out 4 cars.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: cpu_recipe.sh DATA_DIR [RUNS_DIR]}
R=${2:-runs/carvana-cpu}
CPU_CLASS=${CPU_CLASS:-$(python -c 'import utils; print("bf16" if utils.cpu_has_bf16_units() else "avx2")')}
case "$CPU_CLASS" in  # epochs1 size1 epochs2 size2 sizes features
  bf16) DEFAULTS=(16 256x384 9 384x576 "384x576 448x672 512x768" "16 32 64 128 256") ;;
  avx2) DEFAULTS=(8 192x288 6 384x576 "384x576 448x672 512x768" "8 16 32 64 128 256") ;;
  *) echo "error: CPU_CLASS must be bf16 or avx2, not '$CPU_CLASS'" >&2; exit 2 ;;
esac
EPOCHS1=${EPOCHS1:-${DEFAULTS[0]}} SIZE1=${SIZE1:-${DEFAULTS[1]}} EPOCHS2=${EPOCHS2:-${DEFAULTS[2]}}
SIZE2=${SIZE2:-${DEFAULTS[3]}} SIZES=${SIZES:-${DEFAULTS[4]}} FEATURES=${FEATURES:-${DEFAULTS[5]}}
echo "CPU class $CPU_CLASS: UNet $FEATURES; $EPOCHS1 epochs at $SIZE1, then $EPOCHS2 at $SIZE2;" \
  "scored at inputs of $SIZES"
mkdir -p "$R"
# shellcheck disable=SC2206
COMMON=(--data-dir "$DATA" --features $FEATURES --batch-size 2 --val-cars 4 --workers 1
  --num-predictions 0)
# shellcheck disable=SC2086
python train.py "${COMMON[@]}" --height "${SIZE1%x*}" --width "${SIZE1#*x}" --epochs "$EPOCHS1" \
  --lr "${LR1:-1.5e-3}" ${EXTRA:-} --out-dir "$R/stage1" 2>&1 | tr '\r' '\n' | grep -v 'it/s' > "$R.stage1.log"
# shellcheck disable=SC2086
python train.py "${COMMON[@]}" --height "${SIZE2%x*}" --width "${SIZE2#*x}" --epochs "$EPOCHS2" \
  --lr "${LR2:-5e-4}" --fp32-warmup 0 --edge-weight "${EDGE:-5}" ${AUG2:-} ${EXTRA:-} --init "$R/stage1/last.pt" \
  --out-dir "$R/stage2" 2>&1 | tr '\r' '\n' | grep -v 'it/s' > "$R.stage2.log"
# shellcheck disable=SC2086
python evaluate.py --checkpoint "$R/stage2/best.pt" --data-dir "$DATA" --tta --workers 1 \
  --size $SIZES 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$R.evaluate.log"
python - "$R/stage1/metrics.csv" "$R/stage2/metrics.csv" <<'PY'
import csv, sys
minutes = [sum(float(r["seconds"]) for r in csv.DictReader(open(path))) / 60 for path in sys.argv[1:]]
print(f"training: {minutes[0]:.1f} + {minutes[1]:.1f} = {sum(minutes):.1f} min (epoch times in metrics.csv)")
PY
