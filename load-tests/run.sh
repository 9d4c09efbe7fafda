#!/usr/bin/env bash
# Benchmarks mmgate against its ceilings and the realistic alternative on this
# machine, side by side, per image:
#   ceiling-openvino, ceiling-onnxruntime: decode + preprocess + engine in one
#     process with every core (bin `ceiling`), on each backend
#   mmgate-openvino (the default config), mmgate-onnxruntime
#     (MMGATE_BACKEND=onnxruntime-cpu): end to end over HTTP at concurrency
#     1, 8 and 32 (bin `loadgen`)
#   alternative: FastAPI + uvicorn (2 workers) + PIL + OpenVINO bf16, one
#     infer request per thread (load-tests/alternative.sh), same load
# Rounds alternate all of them so drift on a noisy machine hits each alike;
# the summary reports medians over rounds and ratios paired per round.
# Env: ROUNDS (3), SECS (10), FILES, CONCURRENCY ("1 8 32").
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
FILES=${FILES:-"coffee_640.jpg astronaut_1536.jpg"}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}

. load-tests/lib.sh
start_mmgate openvino
start_mmgate onnxruntime MMGATE_BACKEND=onnxruntime-cpu
start_alternative alternative openvino-bf16
curl -fs "$URL_openvino/v1/models/open_nsfw" >"$OUT/model-openvino.json"
curl -fs "$URL_onnxruntime/v1/models/open_nsfw" >"$OUT/model-onnxruntime.json"

tag() { python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["system"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$@"; }
for round in $(seq "$ROUNDS"); do
  for f in $FILES; do
    echo "round $round: $f" >&2
    for b in openvino onnxruntime-cpu; do
      "$T/ceiling" --backend "$b" --file "tests/fixtures/images/$f" --threads 2 --intra 1 \
        --seconds "$SECS" | tag "ceiling-$b" "$round" >>"$OUT/results.jsonl"
    done
    for sys in openvino onnxruntime alternative; do
      url=URL_$sys; pid=PID_$sys
      for c in $CONCURRENCY; do
        "$T/loadgen" --url "${!url}" --file "tests/fixtures/images/$f" --concurrency "$c" \
          --seconds "$SECS" --pid "${!pid}" | tag "$sys" "$round" >>"$OUT/results.jsonl"
      done
    done
  done
done
curl -fs "$URL_openvino/metrics" >"$OUT/metrics.txt"
python3 load-tests/summarize.py "$OUT" | tee "$OUT/summary.md"
