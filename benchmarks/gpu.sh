#!/usr/bin/env bash
# The GPU benchmarks in one command (H100 or H200): training step, memory and MFU at 160x240 and at
# full Carvana size (eager, then torch.compile'd), the loader, and one timed train.py epoch over 5088
# synthetic Carvana-size images.
#
#   ../shared/device/wheels.sh          # here, once: albumentations and its needs into .whl/
#   bash benchmarks/gpu.sh              # there, with .whl carried; results in $OUT (else ./gpu-results)
#
# $OUT gets few files: gpu.md (the machine, then every table in order) and one JSON per measurement.
# Knobs (environment): SYNTH (/tmp/synth), CARS (318), SIZE (1280x1918), WORKERS (cores - 2),
# PAIRS (3), STEPS (20), IMAGES (256, for the loader rows), FULL_BATCH (4: fp32 at 1280x1918 needs
# about 10 GB an image), EPOCH_BATCHES ("32 8": a train.py epoch at each), FEATURES (64 128 256 512),
# DEVICE (cuda), COMPILE (1: also time the compiled model at full size).
# A CPU smoke run (tests/test_benchmarks.py runs it):
#   DEVICE=cpu CARS=2 SIZE=64x96 FEATURES="4 8" PAIRS=1 STEPS=2 FULL_BATCH=1 IMAGES=16 EPOCH_BATCHES=8 COMPILE=0 \
#     SYNTH=/tmp/gpu-smoke-data OUT=/tmp/gpu-smoke bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
source benchmarks/gpu_wheels.sh  # albumentations from the carried wheels, where the image lacks it
SYNTH=${SYNTH:-/tmp/synth}
CARS=${CARS:-318}
SIZE=${SIZE:-1280x1918}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
PAIRS=${PAIRS:-3}
STEPS=${STEPS:-20}
IMAGES=${IMAGES:-256}
FULL_BATCH=${FULL_BATCH:-4}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:-1}
read -r -a EPOCH_BATCHES <<< "${EPOCH_BATCHES:-32 8}"
read -r -a FEATURES <<< "${FEATURES:-64 128 256 512}"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1  # no version check over a network it lacks
MD="$OUT/gpu.md"

{ echo '```'; nvidia-smi || true; python3 -c 'import sys, torch; print(sys.version); print("torch", torch.__version__)'
  echo "cores: $(nproc)"; free -g || true; df -h /dev/shm || true; echo '```'; } > "$MD" 2>&1
if [ ! -d "$SYNTH/train" ]; then
  echo "generating $CARS synthetic cars at $SIZE in $SYNTH" | tee -a "$MD"
  start=$SECONDS
  python3 synthetic.py --out "$SYNTH" --cars "$CARS" --size "$SIZE" 2>&1 | tail -1 | tee -a "$MD"
  echo "(generation took $(( SECONDS - start )) s)" | tee -a "$MD"
fi

section() { printf '\n## %s\n\n' "$1" | tee -a "$MD"; }

section "training step, memory, MFU and loader at 160x240"
python3 benchmarks/bench_train.py --device "$DEVICE" --features "${FEATURES[@]}" --data-dir "$SYNTH" --height 160 --width 240 \
  --batch-size 8 --workers "$WORKERS" --images "$IMAGES" --pairs "$PAIRS" --steps "$STEPS" --warmup 5 \
  --json "$OUT/train-160x240.json" 2>&1 | tee -a "$MD" || echo "(failed)" | tee -a "$MD"

section "training step, memory and MFU at 1280x1918 (padded to 1280x1920 inside the UNet)"
python3 benchmarks/bench_train.py --device "$DEVICE" --features "${FEATURES[@]}" --height 1280 --width 1918 \
  --batch-size "$FULL_BATCH" --images 0 --pairs "$PAIRS" --steps "$(( STEPS / 2 ))" --warmup 3 \
  --json "$OUT/train-1280x1918.json" 2>&1 | tee -a "$MD" || echo "(failed)" | tee -a "$MD"

epoch() { python3 benchmarks/bench_epoch.py --device "$DEVICE" --features "${FEATURES[@]}" --data-dir "$SYNTH" --cars 0 \
  --workers "$WORKERS" --batch-size "$batch" --skip-baseline --repeats 2 --json "$OUT/epoch-160x240-b$batch.json" "$@" 2>&1 | tee -a "$MD"; }
for batch in "${EPOCH_BATCHES[@]}"; do
  section "one train.py epoch over all $(( CARS * 16 )) images at 160x240, batch $batch (target < 10 s)"
  # Where /dev/shm is too small for the shared cache, say so and time the epoch decoding every batch.
  epoch || { echo "(failed; again with --no-cache)" | tee -a "$MD"; epoch --train-flags --no-cache || echo "(failed)" | tee -a "$MD"; }
done

if [ "$COMPILE" = 1 ]; then
  section "training step at 1280x1918, project side torch.compile'd (train.py --compile)"
  python3 benchmarks/bench_train.py --device "$DEVICE" --features "${FEATURES[@]}" --height 1280 --width 1918 \
    --batch-size "$FULL_BATCH" --images 0 --pairs 1 --steps "$(( STEPS / 2 ))" --warmup 3 --compile \
    --json "$OUT/train-1280x1918-compile.json" 2>&1 | tee -a "$MD" || echo "(failed)" | tee -a "$MD"
fi
