#!/usr/bin/env bash
# The adaptive contrast (beta schedules entropy and jsd) against the constant one, for one task:
#   1. `cold tune` on the tuning split, every schedule, against the base model and against the
#      task's shipped anti-expert (one grid each: ALPHAS x BETAS x constant,entropy,jsd);
#   2. `cold eval` on the test split: expert and the best setting of each schedule, per amateur.
# Every step resumes when rerun (eval-runs/adaptive-TASK-*); the tables are copied to results/adaptive/.
#
#   scripts/adaptive_study.sh coin_flip        # the step-50 snapshot and its anti-expert
#   scripts/adaptive_study.sh last_letters     # the last-letters adapter and its anti-expert
#   scripts/adaptive_study.sh commonsenseqa    # Gemma 3 270M and its hard-negative anti-expert
#
# Environment: TUNE_LIMIT (default 100), TEST_LIMIT (default 200), ALPHAS (default 0.1,0.3),
# BETAS (default 1,4: the adaptive weights lie in [0, 1], so they need larger betas than the
# constant one), AMATEURS (default "base anti-expert"), COLD (the cold command). No scaled expert
# (`--scales 1`): the accuracy table has it. Needs the project installed (make install).
set -euo pipefail
task=${1:?usage: scripts/adaptive_study.sh coin_flip|last_letters|commonsenseqa}
cold=${COLD:-cold}
D=src/cold/demo_adapters
case "$task" in
  coin_flip) args=(--adapter $D/smollm2-coin_flip-step-50 -n 96); anti=$D/smollm2-coin_flip-step-50-selfneg ;;
  last_letters) args=(--adapter $D/smollm2-last_letters -n 96); anti=$D/smollm2-last_letters-selfneg ;;
  commonsenseqa) args=(--model gemma3 --prompt zero-shot -n 16 --adapter $D/gemma3-commonsenseqa-text)
                 anti=$D/gemma3-commonsenseqa-text-hardneg ;;
  *) echo "unknown task $task" >&2; exit 2 ;;
esac
grid=(--alphas "${ALPHAS:-0.1,0.3}" --betas "${BETAS:-1,4}" --schedules constant,entropy,jsd --scales 1)
mkdir -p results/adaptive
best() {  # the best setting of each schedule in a tune.json, comma-separated
  python -c 'import json, sys; print(",".join(v for k, v in json.load(open(sys.argv[1]))["best"].items() if k != "expert"))' "$1"
}
for amateur in ${AMATEURS:-base anti-expert}; do
  extra=()
  [ "$amateur" = anti-expert ] && extra=(--amateur-adapter "$anti")
  out=eval-runs/adaptive-$task-tune-vs-$amateur
  "$cold" tune --task "$task" "${args[@]}" "${extra[@]}" "${grid[@]}" --limit "${TUNE_LIMIT:-100}" --out "$out"
  cp "$out/tune.md" "results/adaptive/$task-tune-vs-$amateur.md"
  cp "$out/heatmap.png" "results/adaptive/$task-tune-vs-$amateur.png"
  test_out=eval-runs/adaptive-$task-test-vs-$amateur
  "$cold" eval --task "$task" "${args[@]}" "${extra[@]}" --limit "${TEST_LIMIT:-200}" \
    --decoders "expert,$(best "$out/tune.json")" --out "$test_out"
  cp "$test_out/summary.md" "results/adaptive/$task-test-vs-$amateur.md"
done
