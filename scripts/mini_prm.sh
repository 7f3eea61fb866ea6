#!/usr/bin/env bash
# Issue 6 on the miniature benchmark, end to end on one machine: SFT a tiny policy, sample it on the
# training and held-out tasks, label the failed samples by binary search (probes through real rollout
# workers and the real sandbox), train a PRM on the training tasks' labels, evaluate it on the held-out
# tasks' labels (line-level AUC, accuracy, calibration, best-of-N).
#   bash scripts/mini_prm.sh [OUT]        (default runs/mini_prm; ~10-15 minutes on 2 cores)
# Env: PSGPO (default .venv/bin/psgpo), N (samples per task, 4), K (completions per probe, 4),
#      SFT_EPOCHS (2), WORKERS (rollout workers for the probes, 1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/mini_prm}
P=${PSGPO:-.venv/bin/psgpo}
PY=${PYTHON:-.venv/bin/python}
N=${N:-4}
K=${K:-4}
WORKERS=${WORKERS:-1}
RUN=mini
STOP='["\ndef ", "\nclass ", "\nif __name__", "\nprint("]'
mkdir -p "$OUT/logs"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
stamp() { echo "[$(date +%T)] $*"; }

stamp "1/7 tasks, tiny models, SFT"
"$P" tasks mini --out "$OUT/tasks" > /dev/null
[ -f "$OUT/models/policy/config.json" ] || "$P" models tiny --out "$OUT/models" --vocab-size 1024 --extra-corpus mini
[ -f "$OUT/sft/config.json" ] || "$P" train sft --data "$OUT/tasks/sft.jsonl" --policy "$OUT/models/policy" \
  --out "$OUT/sft" --epochs "${SFT_EPOCHS:-2}" --lr 3e-3 --batch-size 32 --warmup-steps 20 > "$OUT/logs/sft.log" 2>&1

stamp "2/7 services: Redis, sandbox, rollout workers"
REDIS_PORT=$(free_port)
REDIS_BIN=$("$PY" -c "from services.common.redis_local import redis_server_binary as b; print(b())")
"$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$OUT/logs/redis.log" 2>&1 &
PIDS+=($!)
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
SB_HTTP=$(free_port)
SB_GRPC=$(free_port)
"$P" serve sandbox --http-port "$SB_HTTP" --grpc-port "$SB_GRPC" > "$OUT/logs/sandbox.log" 2>&1 &
PIDS+=($!)
for run in "$RUN-sample" $(for i in $(seq "$WORKERS"); do echo "$RUN-label"; done); do
  "$P" serve rollout --policy "$OUT/sft" --run "$run" --redis "$REDIS_URL" --sandbox "127.0.0.1:$SB_GRPC" \
    > "$OUT/logs/rollout-$run-$RANDOM.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$SB_HTTP/readyz" > /dev/null && break
  sleep 1
done

for split in train test; do
  stamp "3/7 sample $split tasks ($N per task)"
  rm -f "$OUT/samples-$split.jsonl"
  "$P" label sample --run "$RUN" --redis-url "$REDIS_URL" --tasks "$OUT/tasks/$split.jsonl" --n "$N" \
    --max-new-tokens 160 --checkpoint sft --out "$OUT/samples-$split.jsonl"
  stamp "4/7 label $split samples (K=$K)"
  "$P" label run --run "$RUN" --redis-url "$REDIS_URL" --sandbox-url "http://127.0.0.1:$SB_HTTP" \
    --input "$OUT/samples-$split.jsonl" --out "$OUT/labels-$split.jsonl" --k "$K" --max-new-tokens 160 \
    --stop "$STOP"
done

stamp "5/7 train the PRM on the training tasks' labels"
"$P" train prm --data "$OUT/labels-train.jsonl" --model "$OUT/sft" --out "$OUT/prm" --epochs 8 --lr 1e-3 \
  --batch-size 16 > "$OUT/logs/prm_train.log" 2>&1
tail -1 "$OUT/logs/prm_train.log"
stamp "6/7 evaluate on the held-out tasks' labels and best-of-$N on their samples"
"$PY" - "$OUT" <<'EOF2'
import json, sys
out = sys.argv[1]
groups = {}
for line in open(f"{out}/samples-test.jsonl"):
    row = json.loads(line)
    group = groups.setdefault(row["task_id"], {"task_id": row["task_id"], "prompt": row["prompt"], "samples": []})
    group["samples"].append({"response": row["response"], "passed": row["passed"], "logprob": row.get("logprob")})
with open(f"{out}/groups-test.jsonl", "w") as f:
    f.writelines(json.dumps(g) + "\n" for g in groups.values())
EOF2
"$P" eval prm --data "$OUT/labels-test.jsonl" --groups "$OUT/groups-test.jsonl" --model "$OUT/prm" \
  --out "$OUT/prm_eval"
stamp "7/7 done: $OUT/prm_eval/prm_eval.json"
