#!/usr/bin/env bash
# Raw tensors over the KServe v2 protocol (HTTP binary and gRPC) against the
# engine alone, in one run: `ceiling --model-only` (the model's 2 instances
# × 1 thread, batch 1, in process, no HTTP/IPC) before and after, and
# `v2load` at each concurrency over each protocol against `mmgate serve`
# with the default config, then Triton's own load tool, perf_analyzer
# (`setup.sh test` unpacks it), with the README's commands over each
# protocol. Env: CONCURRENCY ("1 8 32"), SECS (8), N (1200),
# PA_RANGE ("1:32:8", perf_analyzer's --concurrency-range).
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS=v2raw . load-tests/lib.sh
engine() {
  "$T/ceiling" --backend openvino --model-only "${N:-1200}" --threads 2 --intra 1 | tee -a "$OUT/results.jsonl"
}
engine
start_mmgate v2 MMGATE_GRPC_LISTEN=127.0.0.1:0
grpc=$(sed -n 's/^mmgate grpc listening on //p' "$OUT/mmgate-v2.out")
for c in ${CONCURRENCY:-1 8 32}; do
  for p in http grpc; do
    url=$URL_v2; [ "$p" = grpc ] && url=$grpc
    "$T/v2load" --protocol "$p" --url "$url" --concurrency "$c" --seconds "${SECS:-8}" \
      | tee -a "$OUT/results.jsonl"
  done
done
PA=.deps/perf-analyzer/perf_analyzer
if [ -x "$PA" ]; then
  for p in http grpc; do
    url=${URL_v2#http://}; [ "$p" = grpc ] && url=$grpc
    "$PA" -m open_nsfw -u "$url" -i "$p" --concurrency-range "${PA_RANGE:-1:32:8}" \
      -f "$OUT/perf_analyzer-$p.csv" > "$OUT/perf_analyzer-$p.out"
    sed "s/^/perf_analyzer $p: /" "$OUT/perf_analyzer-$p.csv" >&2
  done
else
  echo "perf_analyzer: $PA is missing (bash scripts/setup.sh test); skipped" >&2
fi
kill "$PID_v2"; wait "$PID_v2" 2>/dev/null || true
engine
echo "results: $OUT" >&2
