#!/usr/bin/env bash
# CUDA check of the distillation engine on the tiny presets: SFT a few steps, VLsI (verbalize -> interact -> SFT)
# a few steps on one GPU, the same under torchrun with FSDP2 (one rank), the teacher-cache path and final-logit KD.
# Prints one summary line per check and a final JSON line. Needs `make setup` (or the .venv) and one CUDA GPU.
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu-check-out}
rm -rf "$OUT" && mkdir -p "$OUT"
DATA="builtin:shapes:n_pretrain=64,n_train=64,n_val=0,n_test=32,seed=3"
T=builtin:tiny-qwen2vl-teacher
S=builtin:tiny-qwen2vl-student
check() {  # name, command... (writes OUT/name.log and OUT/name.status)
    local name=$1; shift
    local start=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "ok $((SECONDS - start))" > "$OUT/$name.status"
        echo "ok    $name ($((SECONDS - start)) s)"
    else
        echo "fail $((SECONDS - start))" > "$OUT/$name.status"
        echo "FAIL  $name (see $OUT/$name.log)"; grep -v "it/s" "$OUT/$name.log" | tail -5
    fi
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1

check train $PY -m vlsi_edge.cli train --model $S --data $DATA --split pretrain --steps 20 --batch-size 8 --out "$OUT/sft"
# the three distillation checks are independent: run them side by side
check distill $PY -m vlsi_edge.cli distill --teacher $T --student "$OUT/sft/student" --data $DATA \
    --steps verbalize=5,interact=10,sft=5 --batch-size 8 --out "$OUT/vlsi" &
check distill_fsdp2 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m vlsi_edge.cli distill \
    --teacher $T --student "$OUT/sft/student" --data $DATA --steps verbalize=5,interact=10,sft=5 --batch-size 8 \
    --out "$OUT/vlsi-fsdp2" --set train.distributed=fsdp2 &
check distill_cache $PY -m vlsi_edge.cli distill --teacher $T --student "$OUT/sft/student" --data $DATA \
    --steps verbalize=5,interact=10,sft=5 --batch-size 8 --out "$OUT/vlsi-cache" --cache-teacher "$OUT/cache" &
check distill_kd $PY -m vlsi_edge.cli distill --method kd --teacher $T --student "$OUT/sft/student" --data $DATA \
    --steps kd=10 --batch-size 8 --out "$OUT/kd" &
wait
check eval $PY -m vlsi_edge.cli eval --model "$OUT/vlsi/student" --data $DATA --split test --out "$OUT/preds.json" \
    --device cuda
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for run in ("sft", "vlsi", "vlsi-fsdp2", "vlsi-cache", "kd"):
    path = out / run / "metrics.jsonl"
    if path.exists():
        last = [json.loads(line) for line in path.open()][-1]
        print(f"{run:<11} last {last['phase']} step {last['step']} loss {last['loss']:.4f}")
PY
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
checks = {}
for f in sorted(out.glob("*.status")):
    state, seconds = f.read_text().split()
    checks[f.stem] = {"ok": state == "ok", "seconds": int(seconds)}
print(json.dumps({"gpu_check": checks}))
PY
