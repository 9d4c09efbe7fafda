#!/usr/bin/env bash
# `mmgate tune` on this machine: its progress, table and pick (the pick is
# measured against the config's own settings, alternating, in the same run).
# Env: FILES (coffee_640.jpg), BUDGET (5m), CONCURRENCY (16), TRIAL (4).
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-coffee_640.jpg}

RESULTS=tune . load-tests/lib.sh
inputs=()
for f in $FILES; do inputs+=("tests/fixtures/images/$f"); done
"$T/mmgate" tune --config "${CONFIG:-configs/default.toml}" --inputs "${inputs[@]}" \
  --budget "${BUDGET:-5m}" --concurrency "${CONCURRENCY:-16}" --trial-seconds "${TRIAL:-4}" \
  --out "$OUT/tuned.toml" 2> >(tee "$OUT/progress.txt" >&2) | tee "$OUT/table.md"
echo "results: $OUT" >&2
