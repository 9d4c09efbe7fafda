#!/usr/bin/env bash
# Light tenants taking turns on the latency lane: tenant `flood` (standard,
# max_concurrency 16) saturates the gateway closed loop at concurrency 16,
# while tenants `x` and `y` (standard too) each send one image after
# another (closed loop, concurrency 1), all for SECS (30), 640×480 JPEGs.
# Each of x and y always has nothing running when its image arrives, so
# each may take the lane; prints every tenant's img/s and the flood's share
# of what was served. Equal weights: a third each would be fair if all
# three always had work queued; x and y, closed loops of one, have none
# between two images, so they are owed somewhat less. Needs a model with a
# latency lane (OpenVINO, the default).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-30}
RESULTS=turns . load-tests/lib.sh
IMG=tests/fixtures/images/coffee_640.jpg
{
  config_head
  tenant flood standard 'max_concurrency = 16'
  tenant x standard
  tenant y standard
} >"$OUT/turns.toml"
CONFIG=$OUT/turns.toml start_mmgate turns
url=$URL_turns
closed() { "$T/loadgen" --url "$url" --file "$IMG" --api-key "key-$1" --concurrency "$2" --warmup 1 --seconds "$SECS"; }
closed flood 16 >"$OUT/flood.json" &
f=$!
closed x 1 >"$OUT/x.json" &
x=$!
PIDS+=("$f" "$x")
closed y 1 >"$OUT/y.json"
wait "$f"
wait "$x"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
r = {n: json.load(open(f"{out}/{n}.json")) for n in ("flood", "x", "y")}
total = sum(v["throughput_per_s"] for v in r.values())
for n, v in r.items():
    print(f"{n}: {v['throughput_per_s']:.1f} img/s ({v['throughput_per_s'] / total:.0%}), "
          f"p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, {v['errors']} errors")
print(f"served in all: {total:.1f} img/s")
PY
echo "results: $OUT" >&2
