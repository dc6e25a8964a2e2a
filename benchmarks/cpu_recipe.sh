#!/usr/bin/env bash
# The CPU recipe on the 32 shared Carvana cars (28 train, 4 held out by id), in two stages of progressive
# resizing, then scored at 1280x1918 with and without flip TTA and one-region post-processing:
#
#   bash benchmarks/cpu_recipe.sh ../shared/carvana [RUNS_DIR]       # RUNS_DIR default runs/carvana-cpu
#
# A UNet deep enough that its bottleneck sees the whole car (five levels: 12x18 at 384x576). Stage 1 learns the car
# at SIZE1; stage 2 starts from its weights and split (--init) and sharpens the outline at SIZE2 with the outline
# weighted 5x. The held-out cars are scored with the model's inputs at three sizes, their probabilities averaged
# (multi-scale TTA).
# The model, epochs and sizes follow the CPU class (CPU_CLASS, as utils.cpu_has_bf16_units finds it) and this CPU's
# speed: benchmarks/cpu_schedule.py times a few training steps at each size (a minute or two) and takes the class's
# best schedule measured end to end that it estimates to fit MINUTES (30) of training; when none fits, it cuts the one
# nearest to fitting. Its schedules, best first:
#   bf16: bf16 units (bf16 autocast): five levels (16..256); 16 epochs at 256x384, then 9 at 448x672, where a pixel
#         is 2.9 photo pixels (27.3-28.1 min on a 2-core Zen 5), scored at 448x672 512x768 576x864; or the same
#         with stage 2 at 384x576 (23.3 min there); or 8 at 160x240, then 7 at 384x576 (27.4 min on a 2-core Intel Xeon
#         with AMX, where the first takes about 50); these two scored at 384x576 448x672 512x768.
#   avx2: AVX2 only (fp32): six levels half as wide (8..256), whose fp32 step costs 2-3x less than five levels':
#         8 epochs at 192x288, then 6 at 384x576 (32.8 min on a 2-core Xeon held to AVX2, about 23 on a Zen 2,
#         estimated), scored at bf16's inputs; or five levels, 7 at 160x240, then 3 at 320x480 (22.2 min on a Zen 2);
#         or the six levels for 5 epochs at 192x288, then 4 at 384x576 (23.9 min on the Xeon held to AVX2).
# Knobs (environment), for the ablation in BENCHMARKS.md: MINUTES (30; 0: the class's best schedule, not probed),
# CPU_CLASS (bf16 or avx2), and the schedule's own: EPOCHS1, EPOCHS2, SIZE1, SIZE2 (HxW), FEATURES (the UNet), SIZES
# (evaluate.py --size); setting any of these six, or EXTRA, skips the probe and changes only itself in the class's
# best schedule. LR1 (1.5e-3), LR2 (5e-4), EDGE (5: --edge-weight of stage 2), AUG2 (stage 2's augmentation flags,
# e.g. the first place's "--shift 0.0625 --zoom 0.91 1.21 --rotate 7 --grey 0.1"; default none: train.py's ranges),
# EXTRA (more train.py flags for both stages). Both stages use --seed 0, whose split holds out 4 cars.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: cpu_recipe.sh DATA_DIR [RUNS_DIR]}
R=${2:-runs/carvana-cpu}
case "${CPU_CLASS:-auto}" in
  auto|bf16|avx2) ;;
  *) echo "error: CPU_CLASS must be bf16, avx2 or auto, not '$CPU_CLASS'" >&2; exit 2 ;;
esac
MINUTES=${MINUTES:-30}
if [ -n "${EPOCHS1:-}${SIZE1:-}${EPOCHS2:-}${SIZE2:-}${FEATURES:-}${SIZES:-}${EXTRA:-}" ]; then
  MINUTES=0  # a schedule given by hand: no probe
fi
STAGE=(--batch-size 2 --val-cars 4 --workers 1 --device cpu)  # what sets a stage's cost and split: probed as trained
SCHEDULE=$(python benchmarks/cpu_schedule.py --cpu-class "${CPU_CLASS:-auto}" --minutes "$MINUTES" \
  --data-dir "$DATA" --dir "$(dirname "$R")" -- "${STAGE[@]}")
eval "$SCHEDULE"  # CPU_CLASS as found; FEATURES, EPOCHS1, SIZE1, EPOCHS2, SIZE2, SIZES unless already set
echo "CPU class $CPU_CLASS: UNet $FEATURES; $EPOCHS1 epochs at $SIZE1, then $EPOCHS2 at $SIZE2;" \
  "scored at inputs of $SIZES (to repeat: FEATURES=\"$FEATURES\" EPOCHS1=$EPOCHS1 SIZE1=$SIZE1 EPOCHS2=$EPOCHS2" \
  "SIZE2=$SIZE2 SIZES=\"$SIZES\")"
mkdir -p "$R"
# shellcheck disable=SC2206
COMMON=(--data-dir "$DATA" --features $FEATURES "${STAGE[@]}" --num-predictions 0)
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
