#!/usr/bin/env bash
# CPU-sized Carvana recipes trained side by side on one GPU, each then evaluated at its training size
# and at full resolution, with and without TTA. Each recipe's epochs are what fits in about
# 28 minutes of training on the 2-core development CPU, so the GPU ranks CPU recipes in minutes.
#
#   bash benchmarks/recipe_sweep.sh DATA_DIR [RUNS_DIR]     # RUNS_DIR default /tmp/sweep
#
# Eight train.py processes share the GPU, one loader worker each. Summaries: RUNS_DIR/NAME.sum.
# Knobs (environment): DEVICE (cuda). Relative paths are taken from the repository's root, as in the other scripts.
set -u
cd "$(dirname "$0")/.."
DATA=${1:?usage: recipe_sweep.sh DATA_DIR [RUNS_DIR]}
R=${2:-/tmp/sweep}
DEVICE=${DEVICE:-cuda}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
one() {
  name=$1; shift
  python3 train.py --data-dir "$DATA" --val-cars 4 --workers 1 --device "$DEVICE" --num-predictions 0 \
    --out-dir "$R/$name" "$@" > "$R/$name.train.log" 2>&1
  python3 evaluate.py --checkpoint "$R/$name/best.pt" --tta --data-dir "$DATA" --workers 1 --device "$DEVICE" \
    > "$R/$name.eval.log" 2>&1
  echo "== $name: $*"; tail -12 "$R/$name.eval.log"
}
F4="--features 16 32 64 128"
one A  $F4 --height 160 --width 240 --epochs 60 --batch-size 8 --lr 3e-3 > "$R/A.sum" &
one B  $F4 --height 224 --width 336 --epochs 40 --batch-size 8 --lr 3e-3 > "$R/B.sum" &
one C  $F4 --height 256 --width 384 --epochs 28 --batch-size 8 --lr 3e-3 > "$R/C.sum" &
one C5 --features 16 32 64 128 256 --height 256 --width 384 --epochs 26 --batch-size 8 --lr 3e-3 > "$R/C5.sum" &
one D  --features 24 48 96 192 --height 160 --width 240 --epochs 40 --batch-size 8 --lr 3e-3 > "$R/D.sum" &
one E  $F4 --height 160 --width 240 --epochs 60 --batch-size 8 --lr 1e-3 > "$R/E.sum" &
one F  $F4 --height 256 --width 384 --epochs 28 --batch-size 4 --lr 2e-3 > "$R/F.sum" &
one G  $F4 --height 192 --width 288 --epochs 50 --batch-size 8 --lr 3e-3 > "$R/G.sum" &
wait
cat "$R"/*.sum
