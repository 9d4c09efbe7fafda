#!/usr/bin/env bash
# GPU checks for a host with an NVIDIA GPU (driver >= 580, CUDA 13), sized to
# finish within 10 minutes. Runs:
#   gpu        nvidia-smi lists a GPU (plus what the loader cache has of
#              TensorRT, nvJPEG and NVRTC, for the record)
#   setup      scripts/setup.sh test (needs the package registries; NVRTC
#              13.0 lands in .deps/nvrtc)
#   build      cargo build --release --workspace --bins
#   device     gpu-executor's device tests (tests/gpu_device.rs):
#              MMGATE_GPU_TESTS=1, one thread
#   scores     gpu-executor's CUDA and TensorRT scores against the CPU
#              (tests/gpu_scores.rs), only when MMGATE_ORT_GPU_LIBRARY names an
#              onnxruntime-gpu library (its CUDA libraries must be on
#              LD_LIBRARY_PATH, and TensorRT 10's for the TensorRT part)
#   bench      mmgate serve with configs/examples/gpu.toml, then `loadgen`
#              for BENCH_SECS (20) at BENCH_CONCURRENCY (8)
# and prints one summary: each check PASS, FAIL or SKIP with its reason.
# Exits non-zero when any check failed.
# Env: CARGO_TARGET_DIR, MMGATE_ORT_GPU_LIBRARY, SKIP_SETUP=1 (no network),
#      BUDGET_S (570: the whole run's time limit), BENCH_SECS, BENCH_CONCURRENCY.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/mmgate-gpu-check.XXXXXX")
RESULTS=()

record() { RESULTS+=("$(printf '%-5s %-7s %s' "$1" "$2" "$3")"); }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# check NAME LIMIT_S CMD...: runs CMD with its output in $LOGS/NAME.log, for at
# most LIMIT_S seconds or what is left of the budget; records PASS or FAIL.
check() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS t; shift 2
  t=$(left)
  [ "$t" -lt "$limit" ] && limit=$t
  if [ "$limit" -lt 10 ]; then record SKIP "$name" "out of time (BUDGET_S=$BUDGET_S)"; return 1; fi
  echo "== $name: $* (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    record PASS "$name" "$(( SECONDS - t0 ))s"; return 0
  fi
  tail -n 30 "$LOGS/$name.log" >&2
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record FAIL "$name" "timed out after ${limit}s (log: $LOGS/$name.log)"
  else record FAIL "$name" "exit $rc (log: $LOGS/$name.log)"; fi
  return 1
}

# --- The GPU and the loader cache ---------------------------------------------
if nvidia-smi -L >"$LOGS/gpu.log" 2>&1 && grep -q '^GPU ' "$LOGS/gpu.log"; then
  cat "$LOGS/gpu.log"
  record PASS gpu "$(grep -c '^GPU ' "$LOGS/gpu.log") GPU(s); $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | sed 's/^/driver /')"
else
  cat "$LOGS/gpu.log" >&2
  record FAIL gpu "nvidia-smi -L lists no GPU"
fi
echo "loader cache (TensorRT, nvJPEG, NVRTC):"
ldconfig -p | grep -E 'nvinfer|nvjpeg|nvrtc' || echo "  none"

# --- Set-up and build ---------------------------------------------------------
if [ -n "${SKIP_SETUP:-}" ]; then
  record SKIP setup "SKIP_SETUP is set"
else
  check setup 120 bash scripts/setup.sh test || true
fi
BUILT=
check build 300 cargo build --release --workspace --bins && BUILT=1

# NVRTC: the 13.0 one set-up unpacked, else the system's (CUDA toolkit).
if [ -f .deps/nvrtc/libnvrtc.so.13 ]; then
  export LD_LIBRARY_PATH="$PWD/.deps/nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
elif [ -f /usr/local/cuda/lib64/libnvrtc.so.13 ]; then
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >&2

# --- Device tests -------------------------------------------------------------
check device 180 env MMGATE_GPU_TESTS=1 cargo test --release -p gpu-executor --test gpu_device \
  -- --nocapture --test-threads=1 || true
if [ -f "$LOGS/device.log" ]; then
  # The test harness's own summary, and any skip reasons the tests printed.
  grep -E '^test result:|skip' "$LOGS/device.log" >&2 || true
fi

# --- CUDA and TensorRT scores against the CPU ---------------------------------
if [ -n "${MMGATE_ORT_GPU_LIBRARY:-}" ] && [ -f "$MMGATE_ORT_GPU_LIBRARY" ]; then
  check scores 180 env MMGATE_GPU_TESTS=1 cargo test --release -p gpu-executor --test gpu_scores \
    -- --nocapture || true
elif [ -n "${MMGATE_ORT_GPU_LIBRARY:-}" ]; then
  record FAIL scores "MMGATE_ORT_GPU_LIBRARY=$MMGATE_ORT_GPU_LIBRARY is not a file"
else
  record SKIP scores "not checked: no onnxruntime-gpu library (set MMGATE_ORT_GPU_LIBRARY)"
fi

# --- A short benchmark --------------------------------------------------------
BENCH_SECS=${BENCH_SECS:-20}
BENCH_CONCURRENCY=${BENCH_CONCURRENCY:-8}
BENCH_FILE=tests/fixtures/images/coffee_640.jpg
if [ -z "$BUILT" ]; then
  record SKIP bench "no build (see build)"
elif [ ! -f configs/examples/gpu.toml ]; then
  record SKIP bench "no configs/examples/gpu.toml"
elif [ "$(left)" -lt $((BENCH_SECS + 90)) ]; then
  record SKIP bench "out of time (BUDGET_S=$BUDGET_S)"
else
  # lib.sh: start_mmgate (free port, waits for /readyz), $T, $OUT, and an
  # EXIT trap that stops the gateway.
  export CONFIG=configs/examples/gpu.toml
  # Serve on the GPU library when there is one (the example's own
  # ort_library is the CPU build, which can only fall back).
  if [ -n "${MMGATE_ORT_GPU_LIBRARY:-}" ]; then export MMGATE_ORT_LIBRARY=$MMGATE_ORT_GPU_LIBRARY; fi
  # shellcheck source=load-tests/lib.sh
  NO_BUILD=1 RESULTS=gpu . load-tests/lib.sh
  start_mmgate gpu
  # shellcheck disable=SC2154 # URL_gpu, PID_gpu: set by start_mmgate
  if [ -z "${URL_gpu:-}" ] || ! curl -fs "$URL_gpu/readyz" >/dev/null; then
    tail -n 30 "$OUT/mmgate-gpu.err" >&2 || true
    record FAIL bench "mmgate did not become ready with configs/examples/gpu.toml (log: $OUT/mmgate-gpu.err)"
  elif timeout $((BENCH_SECS + 60)) "$T/loadgen" --url "$URL_gpu" --file "$BENCH_FILE" \
         --concurrency "$BENCH_CONCURRENCY" --seconds "$BENCH_SECS" --pid "$PID_gpu" \
         >"$OUT/results.jsonl" 2>"$LOGS/bench.log"; then
    cat "$OUT/results.jsonl"
    # What the gateway said about its GPU backend (a silent CPU fallback
    # would make the numbers meaningless).
    grep -iE 'gpu|cuda|tensorrt|fall' "$OUT/mmgate-gpu.out" "$OUT/mmgate-gpu.err" | head -n 10 >&2 || true
    line=$(python3 - "$OUT/results.jsonl" <<'EOF'
import json, sys
d = json.loads(open(sys.argv[1]).read().splitlines()[-1])
ok, err = d.get("ok", 0), d.get("errors", 0)
rest = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("file", "ok", "errors"))
print(("PASS" if ok > 0 and err == 0 else "FAIL") + f"|{ok} ok, {err} errors; {rest}")
EOF
)
    # What really served: a CPU fallback is reported, not hidden.
    ran=$(curl -fs "$URL_gpu/v1/models/open_nsfw" | python3 -c 'import json,sys; r=json.load(sys.stdin)["runtime"]; print(r["backend"], r["device"], "fallbacks:", r["fallbacks"] or "none")' || echo "unknown")
    verdict=${line%%|*}
    case $ran in
      onnxruntime-cuda*|onnxruntime-tensorrt*) ;;
      # Numbers from a CPU fallback are not GPU numbers.
      *) if [ -n "${MMGATE_ORT_GPU_LIBRARY:-}" ]; then verdict=FAIL; else verdict=SKIP; fi ;;
    esac
    record "$verdict" bench "${line#*|}; served by $ran (results: $OUT)"
  else
    tail -n 30 "$LOGS/bench.log" >&2
    record FAIL bench "loadgen failed (log: $LOGS/bench.log)"
  fi
fi

# --- Summary ------------------------------------------------------------------
echo
echo "==== mmgate GPU check ($(( SECONDS - START ))s; logs in $LOGS) ===="
printf '%s\n' "${RESULTS[@]}"
echo "===="
for r in "${RESULTS[@]}"; do
  case $r in FAIL*) exit 1 ;; esac
done
exit 0
