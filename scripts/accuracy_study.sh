#!/usr/bin/env bash
# The accuracy study of docs/accuracy.md for one task and one adapter, end to end and resumable:
#   1. train the task's adapter with snapshots (only when ADAPTER is the default and missing),
#   2. `cold tune` on the tuning split (alpha x beta x LoRA scale) with that adapter,
#   3. `cold eval` on the test split: base (with the default adapter only), expert, the best scale
#      (or 1.5) and the best CoLD setting.
# Every step writes to runs/train/ or eval-runs/ and resumes when rerun.
#
#   scripts/accuracy_study.sh coin_flip                                        # the final adapter
#   scripts/accuracy_study.sh coin_flip runs/train/smollm2-coin_flip/step-50   # a weaker snapshot
#   TEST_LIMIT=200 scripts/accuracy_study.sh last_letters
#
# Environment: TUNE_LIMIT (default 100), TEST_LIMIT (default: all), SPLIT (default: test),
# NEW_TOKENS (default 96), ALPHAS (default 0.1,0.3), BETAS (default 0.5,1,2), SCALES (default
# 1.5,2), STEPS (default 300) and SNAPSHOTS (default "50 100 200") for training, THREADS (torch
# threads, default 1), COLD (the cold command). Needs the project installed (make install).
set -euo pipefail
task=${1:?usage: scripts/accuracy_study.sh coin_flip|last_letters|gsm8k [ADAPTER_DIR]}
adapter=${2:-runs/train/smollm2-$task}
split=${SPLIT:-test}
new=${NEW_TOKENS:-96}
export OMP_NUM_THREADS=${THREADS:-1}
cold=${COLD:-cold}
label=$(basename "$adapter")
[ "$label" = "smollm2-$task" ] || label="smollm2-$task-$label"
limit_args=()
[ -n "${TEST_LIMIT:-}" ] && limit_args=(--limit "$TEST_LIMIT")

if [ ! -f "$adapter/adapter_model.safetensors" ] && [ -z "${2:-}" ]; then
  save_at=()
  for s in ${SNAPSHOTS:-50 100 200}; do save_at+=(--save-at "$s"); done
  "$cold" train --task "$task" --output-dir "$adapter" --max-steps "${STEPS:-300}" "${save_at[@]}" \
    --learning-rate 5e-4 --max-length 256 --threads "$OMP_NUM_THREADS"
fi

tune_out=eval-runs/tune-$label
"$cold" tune --task "$task" --adapter "$adapter" --limit "${TUNE_LIMIT:-100}" -n "$new" --out "$tune_out" \
  --alphas "${ALPHAS:-0.1,0.3}" --betas "${BETAS:-0.5,1,2}" --scales "${SCALES:-1.5,2}"
# the best LoRA scale (expert@1.5 when the adapter's own scale wins, so a scaled row is always shown)
# and the best CoLD setting
best=$(python3 -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(','.join(v if v != 'expert' else 'expert@1.5' for v in b.values()))" "$tune_out/tune.json")

decoders=expert
[ -n "${2:-}" ] || decoders=base,expert   # base once per task, with the default adapter
decoders="$decoders,$best"
"$cold" eval --task "$task" --split "$split" --adapter "$adapter" -n "$new" "${limit_args[@]}" \
  --decoders "$decoders" --out "eval-runs/$task-$split-$label"
