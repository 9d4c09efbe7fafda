#!/usr/bin/env bash
# Benchmarks mmgate against its ceiling on this machine, side by side:
#   ceiling: decode + preprocess + ONNX Runtime in one process (bin `ceiling`)
#   mmgate:  end to end over HTTP at concurrency 1, 8 and 32 (bin `loadgen`)
# Rounds alternate the two so drift on a noisy machine hits both alike; the
# summary reports medians over rounds. Env: ROUNDS (3), SECS (10), FILES.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
FILES=${FILES:-"coffee_640.jpg astronaut_1536.jpg"}
OUT=load-tests/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"

. load-tests/lib.sh

for round in $(seq "$ROUNDS"); do
  for f in $FILES; do
    echo "round $round: $f" >&2
    "$T/ceiling" --file "tests/fixtures/images/$f" --threads 2 --intra 1 --seconds "$SECS" >>"$OUT/ceiling.jsonl"
    for c in 1 8 32; do
      "$T/loadgen" --url "$URL" --file "tests/fixtures/images/$f" --concurrency "$c" \
        --seconds "$SECS" --pid "$PID" >>"$OUT/mmgate.jsonl"
    done
  done
done
curl -fs "$URL/metrics" >"$OUT/metrics.txt"
python3 load-tests/summarize.py "$OUT"
