#!/usr/bin/env bash
# Fairness and priority between tenants, open loop (load-tests/src/bin/openloop.rs):
# 1. capacity C: closed loop, concurrency 8, 640×480 JPEGs;
# 2. fairness: tenant `steady` sends 10% of C alone, then again while tenant
#    `flooder` (standard too, max_concurrency 16) sends 10× C;
# 3. priority: tenant `vip` (critical) sends 10% of C alone, then again while
#    tenant `bulk` (batch) saturates the gateway closed loop at concurrency 32.
# Prints each phase's JSON and the ratios of p99s. Env: SECS (40: at a
# tenth of capacity that is some 250 requests per phase, so p99 is the
# fourth-slowest; at 15 s it was the second-slowest of 66, and one stall of
# a shared machine set it), THROUGHPUT_PRIORITY
# (scheduling.throughput_priority: idle, the default; low; normal).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-40}
RESULTS=tenants . load-tests/lib.sh
IMG=tests/fixtures/images/coffee_640.jpg
{
  config_head
  printf '[scheduling]\nthroughput_priority = "%s"\n' "${THROUGHPUT_PRIORITY:-idle}"
  tenant flooder standard 'max_concurrency = 16'
  tenant steady standard
  tenant vip critical
  tenant bulk batch
} >"$OUT/tenants.toml"
CONFIG=$OUT/tenants.toml start_mmgate tenants
url=$URL_tenants
open_loop() { "$T/openloop" --url "$url" --file "$IMG" --api-key "key-$1" --rate "$2" --seconds "$SECS"; }

"$T/loadgen" --url "$url" --file "$IMG" --api-key key-steady --concurrency 8 --seconds 5 >"$OUT/capacity.json"
C=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["throughput_per_s"])' "$OUT/capacity.json")
low=$(python3 -c "print(round($C * 0.1, 2))")
high=$(python3 -c "print(round($C * 10, 1))")

open_loop steady "$low" >"$OUT/steady-alone.json"
open_loop flooder "$high" >"$OUT/flooder.json" &
flood=$!
sleep 1
open_loop steady "$low" >"$OUT/steady-flooded.json"
wait "$flood"

open_loop vip "$low" >"$OUT/vip-alone.json"
"$T/loadgen" --url "$url" --file "$IMG" --api-key key-bulk --concurrency 32 --warmup 1 \
  --seconds $((SECS + 2)) >"$OUT/bulk.json" &
bulk=$!
sleep 2
open_loop vip "$low" >"$OUT/vip-loaded.json"
wait "$bulk"

python3 - "$OUT" "$C" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out, cap = sys.argv[1], float(sys.argv[2])
j = lambda n: json.load(open(f"{out}/{n}.json"))
sa, sf, fl, va, vl, bulk = (j(n) for n in
    ("steady-alone", "steady-flooded", "flooder", "vip-alone", "vip-loaded", "bulk"))
print(f"capacity C = {cap:.1f} img/s (closed loop, c=8, 640x480 JPEG)")
print(f"fairness: steady at {sa['rate_per_s']}/s: p99 {sa['ok_p99_ms']:.1f} ms alone, "
      f"{sf['ok_p99_ms']:.1f} ms with flooder at {fl['rate_per_s']}/s -> {sf['ok_p99_ms'] / sa['ok_p99_ms']:.2f}x "
      f"(target <= 2x); steady's answers {sf['statuses']}, timed out {sf['timed_out']}")
print(f"  flooder: {fl['sent']} sent, {fl['statuses']}, refusals p99 {fl['refused_p99_ms']:.1f} ms "
      f"(max {fl['refused_max_ms']:.1f}), timed out {fl['timed_out']}; served "
      f"{fl['statuses'].get('200', 0) / fl['seconds']:.1f} img/s")
print(f"priority: vip at {va['rate_per_s']}/s: p99 {va['ok_p99_ms']:.1f} ms alone, "
      f"{vl['ok_p99_ms']:.1f} ms under batch saturation -> {vl['ok_p99_ms'] / va['ok_p99_ms']:.2f}x "
      f"(target <= 1.5x); vip's answers {vl['statuses']}, {va['sent']} and {vl['sent']} sent")
print(f"  slowest tenth of steady (mean ms): alone {sa['slowest_tenth_mean_ms']}, flooded {sf['slowest_tenth_mean_ms']}")
print(f"  slowest tenth of vip (mean ms): alone {va['slowest_tenth_mean_ms']}, loaded {vl['slowest_tenth_mean_ms']}")
print(f"  bulk (batch, closed loop c=32): {bulk['throughput_per_s']:.1f} img/s, {bulk['errors']} errors")
PY
echo "results: $OUT" >&2
