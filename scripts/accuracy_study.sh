#!/usr/bin/env bash
# The accuracy study of the README for one task, end to end and resumable:
#   1. train the task's adapter with snapshots (skipped when runs/train/smollm2-TASK exists),
#   2. `cold tune` on the tuning split (alpha x beta x LoRA scale),
#   3. `cold eval` on the test split: base, expert, the best scale and the best CoLD setting,
#   4. the same expert / best-scale / best-CoLD comparison for each training snapshot (adapter strength).
# Every step writes to eval-runs/ (or runs/train/) and resumes when rerun.
#
#   scripts/accuracy_study.sh coin_flip            # all problems of the test split
#   TEST_LIMIT=200 scripts/accuracy_study.sh last_letters
#
# Environment: TUNE_LIMIT (default 100), TEST_LIMIT (default: all), SPLIT (default: test),
# NEW_TOKENS (default 96), STEPS (default 300), SNAPSHOTS (default "50 100 200"),
# ALPHAS (default 0.05,0.1,0.3), BETAS (default 0.5,1,2), SCALES (default 1.5,2),
# THREADS (torch threads, default 1). Needs the project installed (make install).
set -euo pipefail
task=${1:?usage: scripts/accuracy_study.sh coin_flip|last_letters|gsm8k}
tune_limit=${TUNE_LIMIT:-100}
split=${SPLIT:-test}
new=${NEW_TOKENS:-96}
steps=${STEPS:-300}
snapshots=${SNAPSHOTS:-50 100 200}
export OMP_NUM_THREADS=${THREADS:-1}
cold=${COLD:-cold}
adapter=runs/train/smollm2-$task
limit_args=()
[ -n "${TEST_LIMIT:-}" ] && limit_args=(--limit "$TEST_LIMIT")

if [ ! -f "$adapter/adapter_model.safetensors" ]; then
  save_at=()
  for s in $snapshots; do save_at+=(--save-at "$s"); done
  "$cold" train --task "$task" --output-dir "$adapter" --max-steps "$steps" "${save_at[@]}" \
    --learning-rate 5e-4 --max-length 256 --threads "$OMP_NUM_THREADS"
fi

tune_out=eval-runs/tune-$task-smollm2
"$cold" tune --task "$task" --adapter "$adapter" --limit "$tune_limit" -n "$new" --out "$tune_out" \
  --alphas "${ALPHAS:-0.05,0.1,0.3}" --betas "${BETAS:-0.5,1,2}" --scales "${SCALES:-1.5,2}"
best=$(python3 -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(','.join(v for v in b.values() if v != 'expert'))" "$tune_out/tune.json")

"$cold" eval --task "$task" --split "$split" --adapter "$adapter" -n "$new" "${limit_args[@]}" \
  --decoders "base,expert,$best" --out "eval-runs/$task-$split-smollm2"

for s in $snapshots; do
  [ -d "$adapter/step-$s" ] || continue
  "$cold" eval --task "$task" --split "$split" --adapter "$adapter/step-$s" -n "$new" "${limit_args[@]}" \
    --decoders "expert,$best" --out "eval-runs/$task-$split-smollm2-step$s"
done
