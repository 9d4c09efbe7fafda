#!/usr/bin/env bash
# Video benchmark: a 60 s 1080p H.264 clip scored at fps=1, end to end
# through mmgate, against the ceiling = the ffmpeg CLI decoding the same
# samples (fps=1, scaled to the model's resize size) plus the raw model time
# for those frames on the same cores. Also the pool's decode throughput
# against the CLI decoding every frame. Env: ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RESULTS=video . load-tests/lib.sh
CLIP=load-tests/results/h264_1080p_60s.mp4
if [ ! -f "$CLIP" ]; then
  ffmpeg -v error -f lavfi -i "testsrc2=size=1920x1080:rate=30" -t 60 -vf "noise=alls=20:allf=t" \
    -c:v libx264 -preset veryfast -b:v 6M -g 250 -pix_fmt yuv420p -movflags +faststart "$CLIP.part.mp4"
  mv "$CLIP.part.mp4" "$CLIP"
fi
start_mmgate openvino
URL=$URL_openvino

now() { date +%s.%N; }
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  t0=$(now); ffmpeg -v error -i "$CLIP" -vf fps=1,scale=256:256 -f null - ; t1=$(now)
  model=$("$T/ceiling" --model-only 60 --threads 2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])')
  t2=$(now); ffmpeg -v error -i "$CLIP" -f null - ; t3=$(now)
  t4=$(now); curl -fs --data-binary @"$CLIP" "$URL/v1/models/open_nsfw/score?fps=1" >"$OUT/answer.json"; t5=$(now)
  python3 - "$t0" "$t1" "$model" "$t2" "$t3" "$t4" "$t5" "$OUT/answer.json" >>"$OUT/video.jsonl" <<'PY'
import json, sys
t0, t1, model, t2, t3, t4, t5 = map(float, sys.argv[1:8])
a = json.load(open(sys.argv[8]))
print(json.dumps({
    "cli_sample_s": t1 - t0, "model_s": model, "ceiling_s": t1 - t0 + model,
    "cli_all_frames_s": t3 - t2, "mmgate_s": t5 - t4,
    "frames_sampled": a["frames_sampled"], "frames_decoded": a["frames_decoded"],
    "decode_ms": a["timings"]["decode_ms"],
}))
PY
done
python3 - "$OUT/video.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
m = lambda k: statistics.median(r[k] for r in rows)
dec_fps = statistics.median(r["frames_decoded"] / (r["decode_ms"] / 1e3) for r in rows)
cli_fps = statistics.median(r["frames_decoded"] / r["cli_all_frames_s"] for r in rows)
print(f"results: {sys.argv[1]}")
print("| ceiling: CLI fps=1 decode s | + model s | = ceiling s | mmgate end to end s | ratio | frames sampled | worker decode frames/s | CLI all-frames decode frames/s |")
print("|---|---|---|---|---|---|---|---|")
print(f"| {m('cli_sample_s'):.2f} | {m('model_s'):.2f} | {m('ceiling_s'):.2f} | {m('mmgate_s'):.2f} | {m('mmgate_s') / m('ceiling_s'):.2f} | {rows[0]['frames_sampled']} | {dec_fps:.0f} | {cli_fps:.0f} |")
PY
