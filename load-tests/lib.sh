# Sourced by the benchmark scripts. Builds (unless NO_BUILD is set) and sets T
# (the binaries). start_mmgate NAME [VAR=value…] starts `mmgate serve` with the
# default config (or $CONFIG, and those environment overrides) on a free port, waits until
# it is ready and sets URL_<NAME> and PID_<NAME>; every service started here
# is stopped on exit. Sets OUT, this run's results folder:
# load-tests/results/[$RESULTS-]<UTC time>.
OUT=load-tests/results/${RESULTS:+$RESULTS-}$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
T=${CARGO_TARGET_DIR:-target}/release
[ -n "${NO_BUILD:-}" ] || cargo build -q --release --workspace --bins
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null' EXIT

start_mmgate() {
  local name=$1; shift
  env "$@" "$T/mmgate" serve --config "${CONFIG:-configs/default.toml}" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$OUT/mmgate-$name.out" 2>"$OUT/mmgate-$name.err" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 100); do grep -q listening "$OUT/mmgate-$name.out" 2>/dev/null && break; sleep 0.1; done
  local url
  url=$(sed -n 's/^mmgate listening on //p' "$OUT/mmgate-$name.out")
  for _ in $(seq 600); do curl -fs "$url/readyz" >/dev/null && break; sleep 0.1; done
  printf -v "URL_$name" %s "$url"
  printf -v "PID_$name" %s "$pid"
}

# config_head: a config's [server] and [executor] sections for the repo's
# .deps (models from $MODELS or configs/models). tenant NAME CLASS [EXTRA]:
# a [[tenants]] entry whose key is key-NAME, with EXTRA lines.
config_head() {
  printf '[server]\nmodels_dir = "%s"\n' "${MODELS:-$PWD/configs/models}"
  printf '[executor]\nort_library = "%s"\nopenvino_library = "%s"\ncache_dir = "%s"\n' \
    "$PWD/.deps/onnxruntime/libonnxruntime.so.1.32.0" "$PWD/.deps/openvino/libopenvino_c.so.2641" "$PWD/.deps/cache"
}
tenant() {
  local hash
  hash=$(printf %s "key-$1" | sha256sum | cut -d' ' -f1)
  printf '[[tenants]]\nname = "%s"\nkey_hashes = ["sha256:%s"]\nclass = "%s"\n%s\n' "$1" "$hash" "$2" "${3:-}"
}

# start_alternative NAME ENGINE: the FastAPI + uvicorn service (alternative.sh).
start_alternative() {
  local name=$1 engine=$2
  ALT_ENGINE=$engine bash load-tests/alternative.sh >"$OUT/alt-$name.out" 2>"$OUT/alt-$name.err" &
  PIDS+=("$!")
  for _ in $(seq 1800); do grep -q listening "$OUT/alt-$name.out" 2>/dev/null && break; sleep 0.1; done
  printf -v "URL_$name" %s "$(sed -n 's/^alternative listening on //p' "$OUT/alt-$name.out")"
  printf -v "PID_$name" %s "$(sed -n 's/^alternative pid //p' "$OUT/alt-$name.out")"
}
