# Sourced by the benchmark scripts: builds (unless NO_BUILD is set), starts
# `mmgate serve` on a free port with the default config, waits until it is
# ready, and stops it on exit. Sets T (binaries), PID and URL. Needs OUT.
T=${CARGO_TARGET_DIR:-target}/release
[ -n "${NO_BUILD:-}" ] || cargo build -q --release --workspace --bins
"$T/mmgate" serve --config configs/default.toml --listen 127.0.0.1:0 >"$OUT/mmgate.out" 2>"$OUT/mmgate.err" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/mmgate.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^mmgate listening on //p' "$OUT/mmgate.out")
for _ in $(seq 600); do curl -fs "$URL/readyz" >/dev/null && break; sleep 0.1; done
