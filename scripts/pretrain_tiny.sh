#!/usr/bin/env bash
# Pretrain the built-in tiny Qwen2-VL teacher and student from scratch on the `pretrain` split of builtin:shapes,
# then score both on the test split (per category, 95% CIs). Resumable: rerun the same command after an
# interruption and each run continues from its last checkpoint.
#   bash scripts/pretrain_tiny.sh [OUT_DIR]            # default pretrain-out/
#   CURRICULUM_RUNS=1 bash scripts/pretrain_tiny.sh    # also the size-curriculum runs (README)
#
# The recipe (measured on a 2-core AMD EPYC, one thread per run; see the README's "Pretraining" section):
# - data: the pretrain split is a curriculum (single large objects, easy 2x2/3x3 scenes, follow-up questions per
#   image); a random-init vision tower sits at the answer prior for thousands of steps on the test-like scenes
#   alone, and leaves it after ~1,000 steps with the curriculum (student: colour 51%, count 34%, pattern 36% at
#   1,000 steps);
# - AdamW lr 1e-3, 200 warm-up steps, cosine to 1e-5, batch 16, full fine-tuning, fp32 on CPU;
# - student 3,000 steps (~0.4 s/step on one thread), teacher 3,000 steps (~2 s/step on one thread).
# Then `python scripts/ship_pretrained.py OUT_DIR` copies them into the package with checksums and accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-pretrain-out}
DATA="builtin:shapes:n_pretrain=30000"
STEPS=${STEPS:-3000}
mkdir -p "$OUT"
train_run() {  # THREADS RUN TRAIN_ARGS...: one `vlsi-edge train` run, skipped when done, resumed when interrupted
  local threads=$1 run=$2 resume=()
  shift 2
  [ -d "$run/student" ] && { echo "already trained: $run/student"; return; }
  [ -f "$run/state/latest.json" ] && resume=(--resume)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} "$BIN/vlsi-edge" train --out "$run" --batch-size 16 \
    --set train.checkpoint_every=250 "$@" "${resume[@]}"
}
for role in student teacher; do
  train_run 1 "$OUT/$role" --model "builtin:tiny-qwen2vl-$role" --data "$DATA" --split pretrain --steps "$STEPS" \
    --lr 1e-3 --set optim.warmup_steps=200
done
# The reproduction's student (benchmarks/reproduce.py): the same recipe cut to 300 steps (100 warm-up, two
# threads), still at the answer prior, so that the teacher is ahead of it; the 3,000-step student is not (README).
train_run 2 "$OUT/student-early" --model builtin:tiny-qwen2vl-student --data "$DATA" --split pretrain --steps 300 \
  --lr 1e-3 --set optim.warmup_steps=100
# The size curriculum (README, "The size curriculum"): a pretrained model continued through the warm-up splits of
# builtin:shapes (n_curriculum: one large object, one small object, two objects in a line; questions on shape,
# colour, which half, and relations), then the pretrain mix again to keep the rest. Each stage is one `vlsi-edge
# train` run that starts from the last stage's student/ with a fresh warm-up and cosine schedule (teacher: ~1 s/step
# on two threads for the warm-up stages, ~2 s/step for the mix).
CURRICULUM="builtin:shapes:n_pretrain=0,n_train=0,n_val=0,n_test=0,n_curriculum=6000"
curriculum() {  # NAME START "K SPLIT STEPS LR DATA [SEED [IMAGE_SIZE]]" ...
  local name=$1 prev=$2 stage k split steps lr data seed size run
  shift 2
  for stage in "$@"; do
    read -r k split steps lr data seed size <<< "$stage"
    run="$OUT/$name/$k-$split"
    train_run 2 "$run" --model "$prev" --data "$data" --split "$split" --steps "$steps" --lr "$lr" \
      --seed "${seed:-0}" ${size:+--image-size "$size"} --set optim.warmup_steps=50
    prev="$run/student"
  done
  mkdir -p "$OUT/$name/student" && cp -r "$prev"/. "$OUT/$name/student/"
}
# Opt-in (CURRICULUM_RUNS=1), as it ran once each; none is shipped: the student's lifts shape and spatial above
# chance; the teacher's lifts shape only after the mixed stages (README). The teacher's pairs stage ran as two runs
# (700 steps, then 500 more after its test accuracy still showed relations at chance); the recipe keeps it as it ran.
roles=(student teacher student-early)
if [ "${CURRICULUM_RUNS:-0}" = 1 ]; then
  curriculum student-curriculum "$OUT/student/student" "1 solo-large 800 1e-3 $CURRICULUM" \
    "2 solo-small 600 1e-3 $CURRICULUM" "3 pairs 800 5e-4 $CURRICULUM" "4 pretrain 600 5e-4 $DATA"
  curriculum teacher-curriculum "$OUT/teacher/student" "1 solo-large 500 1e-3 $CURRICULUM" \
    "2 solo-small 500 1e-3 $CURRICULUM" "3 pairs 700 5e-4 $CURRICULUM" "4 pairs 500 5e-4 $CURRICULUM" \
    "5 pretrain 500 5e-4 $DATA,captions=1"
  # Then mixed stages from the teacher's pairs stage: 500 steps each on the union of solo-small, pairs, train and
  # the captioned pretrain split (`--split a+b`), so the warm-up skills are trained on while the rest comes back.
  MIXED="builtin:shapes:n_pretrain=6000,captions=1,n_curriculum=3000"
  SPLITS="solo-small+pairs+train+pretrain"
  curriculum teacher-mixed "$OUT/teacher-curriculum/3-pairs/student" "1 $SPLITS 500 5e-4 $MIXED 1" \
    "2 $SPLITS 500 5e-4 $MIXED 2" "3 $SPLITS 500 5e-4 $MIXED 3"
  # Then one stage on the relation splits and test-like items, without solo-small and the captions (README,
  # "Stages on triples, pairs and train": run H, the best on the val split).
  curriculum teacher-triples "$OUT/teacher-mixed/student" "1 triples+pairs+train 500 5e-4 $MIXED 4"
  roles+=(student-curriculum teacher-curriculum teacher-mixed teacher-triples)
fi
for role in "${roles[@]}"; do
  "$BIN/vlsi-edge" eval --model "$OUT/$role/student" --data "$DATA" --split test --name "tiny-$role" \
    --out "$OUT/$role-test.json"
done
