#!/usr/bin/env bash
# Deadlines under load: while `loadgen` keeps the default config saturated
# with 1536² JPEGs (concurrency 32), N requests with `X-Request-Timeout: 50`
# are sent one after another; prints each one's status and time, their
# median and max, and how much mmgate_dropped_total{reason="deadline"} and
# the completed decodes moved meanwhile. Env: N (20), SECS (8).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
SECS=${SECS:-8}

RESULTS=deadline . load-tests/lib.sh
start_mmgate openvino
url=$URL_openvino
metric() { curl -fs "$url/metrics" | awk -v m="$1" '$0 ~ "^"m {s += $NF} END {print s + 0}'; }
"$T/loadgen" --url "$url" --file tests/fixtures/images/astronaut_1536.jpg \
  --concurrency 32 --seconds "$SECS" >"$OUT/flood.json" &
flood=$!
sleep 3
dropped0=$(metric 'mmgate_dropped_total\{reason="deadline"')
decoded0=$(metric 'mmgate_stage_duration_seconds_count\{stage="decode"')
for i in $(seq "$N"); do
  curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -H 'X-Request-Timeout: 50' \
    -H 'Content-Type: image/jpeg' --data-binary @tests/fixtures/images/astronaut_1536.jpg \
    "$url/v1/models/open_nsfw/score" >>"$OUT/late.txt"
done
decoded1=$(metric 'mmgate_stage_duration_seconds_count\{stage="decode"')
# The late requests' jobs are dropped when a worker thread reaches them in
# the queue, after their 504: count once the flood has drained.
wait "$flood"
dropped1=$(metric 'mmgate_dropped_total\{reason="deadline"')
python3 - "$OUT" "$dropped0" "$dropped1" "$decoded0" "$decoded1" <<'PY' | tee "$OUT/summary.txt"
import json, statistics, sys
out, d0, d1, c0, c1 = sys.argv[1], *map(float, sys.argv[2:])
rows = [l.split() for l in open(f"{out}/late.txt")]
codes = [r[0] for r in rows]
ms = sorted(float(r[1]) * 1e3 for r in rows)
flood = json.load(open(f"{out}/flood.json"))
print(f"{len(rows)} requests with X-Request-Timeout: 50 behind a c=32 flood "
      f"({flood['throughput_per_s']:.1f} img/s, p50 {flood['p50_ms']:.0f} ms)")
print(f"statuses: {dict((c, codes.count(c)) for c in set(codes))}")
print(f"time to answer: median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms")
print(f"mmgate_dropped_total{{reason=deadline}} moved by {d1 - d0:.0f} "
      f"(after the queue drained); completed decodes by {c1 - c0:.0f} (the flood's) "
      f"while the {len(rows)} were sent")
PY
echo "results: $OUT" >&2
