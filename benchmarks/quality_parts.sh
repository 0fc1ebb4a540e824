#!/usr/bin/env bash
# The quality suite as one background process per setting (seeds inside, methods in priority order),
# sharing one machine or GPU; each part rewrites its JSON after every method, so a run cut short keeps
# what it finished. Then: python -m benchmarks.quality --combine $OUT/quality_part-*.json --tag smol
#   ZOO=/path/to/zoo-smol OUT=/tmp/q B=40 bash benchmarks/quality_parts.sh
set -euo pipefail
ZOO=${ZOO:?set ZOO to a zoo directory}; OUT=${OUT:-benchmarks/results}; B=${B:-500}; SEEDS=${SEEDS:-0 1 2}
METHODS="evo_tv_joint paper_two_stage uniform best_single task_arithmetic_grid ties_grid dare_grid lorahub_40 random
         lorahub_full paper_alpha_only paper_beta_only"
mkdir -p "$OUT/logs"
for S in ood indomain_distractors indomain; do
  RACE=(); [ "$S" = ood ] && RACE=(--race)
  setsid nohup python3 -m benchmarks.quality --repository "$ZOO" --settings $S --seeds $SEEDS --budget "$B" \
    --methods $METHODS "${RACE[@]}" --ood-task upper_first --out "$OUT" --tag "part-$S" \
    > "$OUT/logs/part-$S.log" 2>&1 < /dev/null &
done
echo "started 3 parts (budget $B, seeds $SEEDS); logs in $OUT/logs"
