#!/usr/bin/env bash
# The seeded comparison (benchmarks/configs/seeded.yaml) as two shards side by side, one thread each on a 2-core CPU:
# first both shards sweep their share of the rate cells, then both train their share of the parts, then the report
# of every part. Every step resumes (finished sweep runs and parts are skipped): stop it any time and start it again.
#
#   bash benchmarks/seeded.sh          # sweep, train, report: benchmarks/results/llm-seeded{,-sweep}/
#   bash benchmarks/seeded.sh report   # the report from every finished part
#   bash benchmarks/seeded.sh long     # the training-length checks: configs/long-translation.yaml, long-xsum.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
R="${PYTHON:-python} benchmarks/reproduce.py"
both() {  # both CONFIG key=value...: shards 1/2 and 2/2 side by side
  $R "$@" shard=1/2 & first=$!
  $R "$@" shard=2/2
  wait "$first"
}
case "${1:-all}" in
  all) both benchmarks/configs/seeded.yaml stage=sweep
       both benchmarks/configs/seeded.yaml stage=train
       $R benchmarks/configs/seeded.yaml stage=report ;;
  report) $R benchmarks/configs/seeded.yaml stage=report ;;
  long) for config in long-translation long-xsum; do
          both "benchmarks/configs/$config.yaml" stage=train
          $R "benchmarks/configs/$config.yaml" stage=report
        done ;;
  *) echo "usage: bash benchmarks/seeded.sh [all|report|long]" >&2; exit 2 ;;
esac
