#!/usr/bin/env bash
# Starts the "realistic alternative" that the benchmarks compare mmgate against:
# FastAPI + uvicorn (2 worker processes) + PIL + OpenVINO/ONNX Runtime on CPU,
# load-tests/alternative/app.py. Same API as mmgate's score endpoint:
#   POST /v1/models/open_nsfw/score (body: image bytes), GET /readyz
#
#   ALT_ENGINE=openvino-bf16 bash load-tests/alternative.sh > alt.out &
#
# Creates (once, idempotently) the hash-pinned venv .deps/alt-venv, starts
# uvicorn on 127.0.0.1 on a free port, waits until every worker has loaded the
# model, prints to stdout
#   alternative pid N                            (the uvicorn master)
#   alternative listening on http://127.0.0.1:PORT
# and stays in the foreground until killed; on SIGTERM/SIGINT or exit it stops
# the whole uvicorn process tree. Logs go to stderr.
# Env: ALT_ENGINE (openvino-bf16 | openvino-f32 | onnxruntime), ALT_WORKERS (2),
# ALT_THREADS (inference threads per worker, default cpu_count / workers),
# ALT_MODEL, PYTHON (python3), ALT_READY_TIMEOUT (seconds, 180).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.deps/alt-venv
REQS=load-tests/alternative/requirements.txt
export ALT_ENGINE=${ALT_ENGINE:-openvino-bf16}
export ALT_WORKERS=${ALT_WORKERS:-2}
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in load-tests/alternative/
READY_TIMEOUT=${ALT_READY_TIMEOUT:-180}

say() { echo "alternative: $*" >&2; }

case "$ALT_ENGINE" in
  openvino-bf16|openvino-f32|onnxruntime) ;;
  *) say "ALT_ENGINE must be openvino-bf16, openvino-f32 or onnxruntime, not '$ALT_ENGINE'"; exit 2 ;;
esac

# --- Python environment (hash-pinned) -----------------------------------------
want=$(sha256sum "$REQS" | cut -c1-64)
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$want" ]; then
  say "creating Python environment in $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --only-binary=:all: --require-hashes -r "$REQS" >&2
  echo "$want" > "$VENV/.stamp"
fi

# --- Start uvicorn ---------------------------------------------------------------
# uvicorn --port 0 would give each worker its own port, so pick one first.
PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
LOG=$(mktemp "${TMPDIR:-/tmp}/alternative.XXXXXX.log")

UV=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$UV" ]; then
    # uvicorn runs in its own session and process group (setsid): signal the
    # whole group, so the workers go too even if the master is already gone.
    kill -TERM -- "-$UV" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$UV" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$UV" 2>/dev/null || true
    wait "$UV" 2>/dev/null || true
  fi
  rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Without job control a background job is not a process-group leader, so
# setsid execs uvicorn in place: $! is the uvicorn master and its group id.
# uvloop, not asyncio's loop: with --workers, uvicorn on asyncio leaves Nagle
# on for accepted connections (~40 ms per keep-alive request; see
# requirements.txt); httptools is uvicorn[standard]'s HTTP parser.
setsid "$VENV/bin/python" -m uvicorn app:app --app-dir load-tests/alternative \
  --host 127.0.0.1 --port "$PORT" --workers "$ALT_WORKERS" --loop uvloop --http httptools \
  --no-access-log --log-level warning --timeout-graceful-shutdown 5 \
  </dev/null >&2 2> >(tee -a "$LOG" >&2) &
UV=$!

# Ready when every worker has logged that it loaded the model and /readyz answers.
deadline=$((SECONDS + READY_TIMEOUT))
until [ "$(grep -c '^alternative worker ready' "$LOG" 2>/dev/null)" -ge "$ALT_WORKERS" ] \
    && curl -fs -o /dev/null "$URL/readyz"; do
  if ! kill -0 "$UV" 2>/dev/null; then say "uvicorn exited before it was ready"; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then say "not ready after ${READY_TIMEOUT}s"; exit 1; fi
  sleep 0.2
done

echo "alternative pid $UV"
echo "alternative listening on $URL"

# `wait` returns as soon as a trapped signal arrives (unlike a foreground sleep).
set +e
wait "$UV"
rc=$?
set -e
say "uvicorn exited with status $rc"
exit "$rc"
