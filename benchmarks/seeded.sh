#!/usr/bin/env bash
# The seeded comparison (issue 20): per task, an LR sweep on held-out training examples (grid extended until
# the best rate is inside it), then 3 seeds at the picked rates on a fixed test set; rank 8 for LoRA, TL5,
# TL6 and the VeRA-like setting on five tasks, rank 64 for LoRA and TL6 on SNLI and SQuAD.
#
#   bash benchmarks/seeded.sh A & bash benchmarks/seeded.sh B   # two one-thread lanes, one per core
#   bash benchmarks/seeded.sh report                              # the report from every finished part
#   bash benchmarks/seeded.sh long                                # longer runs: translation, XSum (LoRA, TL6)
#
# Every step resumes: finished sweep cells and parts are skipped, so stop it any time and start it again.
# Lane A runs LoRA and TL6, lane B TL5 and the VeRA-like setting; each lane sweeps and trains its own configs,
# so neither waits for the other. Results: benchmarks/results/issue20-sweep/ (rates) and issue20/ (report).
# Each run of reproduce.py rewrites issue20/reproduce.{md,png} for its own subset, so each lane ends by
# rewriting the whole report from every finished part (the lane that ends last leaves it complete).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R="$PY benchmarks/reproduce.py"
COMMON=(--steps 100 --batch 4 --n-train 400 --dtype bfloat16 --threads 1)
SWEEP=(--sweep --extend "${COMMON[@]}" --n-test 100 --out benchmarks/results/issue20-sweep)
TEST=(--n-test 200 nli=500 --seed 0 1 2 --lr-from benchmarks/results/issue20-sweep/lr_sweep.json
      --out benchmarks/results/issue20)
TASKS=(nli squad translation xsum gsm8k)

report() { $R "${COMMON[@]}" "${TEST[@]}" --tasks "${TASKS[@]}" --configs lora tl5 tl6 vera --ranks 8 64 --report; }

lane() {  # lane CONFIG... : rank 8 on every task, then rank 64 on nli and squad (lane A only)
  for task in "${TASKS[@]}"; do
    $R "${SWEEP[@]}" --tasks "$task" --configs "$@" --ranks 8 --lrs 0.003 0.01 0.03
    $R "${COMMON[@]}" "${TEST[@]}" --tasks "$task" --configs "$@" --ranks 8
  done
}

case "${1:-}" in
  A) lane lora tl6
     for task in nli squad; do
       $R "${SWEEP[@]}" --tasks "$task" --configs lora tl6 --ranks 64 --lrs 0.001 0.003 0.01
       $R "${COMMON[@]}" "${TEST[@]}" --tasks "$task" --configs lora tl6 --ranks 64
     done
     report ;;
  B) lane tl5 vera
     report ;;
  report) report ;;
  long)  # the training-length check, LoRA and TL6 at the 100-step rates: translation 300 steps on 1,200 examples,
          # XSum 200 steps on 800 (all its training documents); each one pass over its data
    for run in translation:300:1200:issue20-long xsum:200:800:issue20-long-xsum; do
      IFS=: read -r name steps n dir <<< "$run"
      LONG=(--steps "$steps" --batch 4 --n-train "$n" --dtype bfloat16 --threads 1 --n-test 200 --seed 0 1 2
            --lr-from benchmarks/results/issue20-sweep/lr_sweep.json --tasks "$name" --ranks 8
            --out "benchmarks/results/$dir")
      $R "${LONG[@]}" --configs lora & lora=$!; $R "${LONG[@]}" --configs tl6; wait "$lora"
      $R "${LONG[@]}" --configs lora tl6 --report
    done ;;
  *) echo "usage: bash benchmarks/seeded.sh A|B|report|long" >&2; exit 2 ;;
esac
