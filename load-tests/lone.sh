#!/usr/bin/env bash
# Lone-request latency, mmgate (default config, over HTTP) against the
# in-process ceiling (decode + preprocess + engine on the latency lane, bin
# `ceiling`), side by side: alternating blocks of single requests, so each
# difference pairs two blocks measured a second apart (`ceiling --paired-url`).
# Env: FILES, BLOCKS (20), PER_BLOCK (40).
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-"coffee_640.jpg astronaut_1536.jpg"}

RESULTS=lone . load-tests/lib.sh
start_mmgate openvino
for f in $FILES; do
  "$T/ceiling" --backend openvino --file "tests/fixtures/images/$f" \
    --paired-url "$URL_openvino" --blocks "${BLOCKS:-20}" --per-block "${PER_BLOCK:-40}" \
    | tee -a "$OUT/results.jsonl"
done
echo "results: $OUT" >&2
