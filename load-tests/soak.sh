#!/usr/bin/env bash
# Soak: MINUTES (10) of mixed valid images, videos and hostile inputs from
# several clients against `mmgate serve` (default config), with a random
# worker or the executor SIGKILLed every 20–40 s (bin `soak`). Checks every
# valid answer, leased slots back to 0, the gateway's RSS and fds flat from
# minute 2; prints the JSON summary and exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-10}
RESULTS=soak . load-tests/lib.sh
start_mmgate soak
"$T/soak" --url "$URL_soak" --pid "$PID_soak" --minutes "$MINUTES" | tee "$OUT/soak.json" | \
  python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("samples"); print(json.dumps(d, indent=1))'
