#!/usr/bin/env bash
# Generates the video test clips with the ffmpeg CLI into OUTDIR (default
# .deps/videos). Small and quick: every clip is synthetic (lavfi sources), so
# nothing is downloaded. setup.sh runs it under a content-hash stamp.
#
#   h264.mp4        10 s, 25 fps, 320×240, GOP 50, B-frames, +faststart
#   hevc10.mp4      HEVC Main10 (yuv420p10le), 4 s, 25 fps
#   vp9.webm        VP9, 4 s, 25 fps
#   av1.mkv         AV1, 2 s (only when an AV1 encoder is available)
#   mpeg4.mkv       MPEG-4 part 2, 2 s
#   rotated.mov     H.264 320×240 stored, display matrix rotating it by 90°
#   rotated180.mov  the same rotated by 180°; rotated270.mp4 by -90° (= 270°)
#   sar.mp4         320×240 stored with a 2:1 sample aspect ratio (640×240 shown)
#   vfr.mkv         variable frame rate: 1 s at 25 fps, then 6 s at 5 fps
#   audio_only.m4a  AAC, no video stream
#   truncated.mp4   h264.mp4 cut at half of its bytes
#   long.mp4        3 hours at 1 fps, 32×32
set -euo pipefail
OUT=${1:-.deps/videos}
mkdir -p "$OUT"
TMP=$(mktemp -d "$OUT/.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

ff() { ffmpeg -hide_banner -loglevel error -nostdin -y "$@"; }
# A moving test pattern with a moving gradient overlaid, so frames differ
# and a model sees something non-trivial.
src() { # duration size rate
  echo "testsrc2=duration=$1:size=$2:rate=$3"
}
X264=(-c:v libx264 -preset veryfast -pix_fmt yuv420p)

ff -f lavfi -i "$(src 10 320x240 25)" "${X264[@]}" -g 50 -keyint_min 50 -sc_threshold 0 \
  -bf 2 -movflags +faststart "$TMP/h264.mp4"
ff -f lavfi -i "$(src 4 320x240 25)" -c:v libx265 -pix_fmt yuv420p10le -preset ultrafast \
  -x265-params log-level=none -tag:v hvc1 "$TMP/hevc10.mp4"
ff -f lavfi -i "$(src 4 320x240 25)" -c:v libvpx-vp9 -deadline realtime -cpu-used 8 \
  -b:v 500k -pix_fmt yuv420p "$TMP/vp9.webm"
ff -f lavfi -i "$(src 2 320x240 25)" -c:v mpeg4 -q:v 4 "$TMP/mpeg4.mkv"
ENCODERS=$(ffmpeg -hide_banner -encoders 2>/dev/null)
if grep -q ' libsvtav1 ' <<<"$ENCODERS"; then
  SVT_LOG=1 ff -f lavfi -i "$(src 2 320x240 25)" -c:v libsvtav1 -preset 12 -pix_fmt yuv420p "$TMP/av1.mkv"
elif grep -q ' libaom-av1 ' <<<"$ENCODERS"; then
  ff -f lavfi -i "$(src 2 320x240 25)" -c:v libaom-av1 -cpu-used 8 -row-mt 1 "$TMP/av1.mkv"
fi

# Rotation: a display matrix written on stream copy (FFmpeg 5.1's mov muxer
# turns the `rotate` tag into the track matrix).
ff -f lavfi -i "$(src 2 320x240 25)" "${X264[@]}" "$TMP/upright.mp4"
ff -i "$TMP/upright.mp4" -c copy -metadata:s:v:0 rotate=90 "$TMP/rotated.mov"
ff -i "$TMP/upright.mp4" -c copy -metadata:s:v:0 rotate=180 "$TMP/rotated180.mov"
ff -i "$TMP/upright.mp4" -c copy -metadata:s:v:0 rotate=-90 "$TMP/rotated270.mp4"
rm "$TMP/upright.mp4"

ff -f lavfi -i "$(src 2 320x240 25)" -vf setsar=2 "${X264[@]}" "$TMP/sar.mp4"

# Variable frame rate: frames 0..24 every 40 ms, then every 200 ms (pts in
# the source's 1/25 s time base, integers so no timestamp is rounded).
ff -f lavfi -i "$(src 2.2 320x240 25)" \
  -vf "setpts='if(lt(N,25),N,25+(N-25)*5)'" -fps_mode vfr \
  "${X264[@]}" "$TMP/vfr.mkv"

ff -f lavfi -i "sine=frequency=440:duration=3" -c:a aac -b:a 64k "$TMP/audio_only.m4a"

size=$(stat -c %s "$TMP/h264.mp4")
head -c $((size / 2)) "$TMP/h264.mp4" > "$TMP/truncated.mp4"

ff -f lavfi -i "testsrc2=duration=10800:size=32x32:rate=1" -c:v libx264 -preset ultrafast \
  -pix_fmt yuv420p -g 300 "$TMP/long.mp4"

# Small upload, huge decode: 200 frames of 4096×4096 (a hostile client's
# way to occupy a worker), for the tests that videos cannot starve images.
ff -f lavfi -i "testsrc2=size=4096x4096:rate=25:duration=8" -c:v libx264 -preset ultrafast \
  -crf 45 -pix_fmt yuv420p -g 250 "$TMP/huge.mp4"

for f in "$TMP"/*; do mv -f "$f" "$OUT/"; done
