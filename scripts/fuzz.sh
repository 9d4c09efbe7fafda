#!/usr/bin/env bash
# Coverage-guided fuzzing of the image decode path (fuzz/, target `decode`:
# see fuzz/fuzz_targets/decode.rs for what counts as a crash) with AFL++
# through afl.rs, on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS]   one afl-fuzz (one core) for SECONDS (300)
#
# Installs cargo-afl (pinned) into .deps/cargo-tools, which builds AFL++ from
# the source the crate bundles into .deps/afl-data; a second run installs
# nothing. Builds the target in its own target dir, seeds a corpus from the
# fixture images of at most 200 KB (plus tiny re-encodings of one, where the
# ffmpeg CLI is installed), fuzzes, prints the fuzzer's numbers and exits 1
# if it found a crash or a hang, naming the files and each crash's panic.
# Env:
#   FUZZ_WORK        corpus and findings (fuzz/work; wiped at each run)
#   FUZZ_TARGET_DIR  build dir ($CARGO_TARGET_DIR/fuzz, else .deps/fuzz-target)
#   FUZZ_JOBS        build jobs (cargo's default)
#   FUZZ_DEADLINE_FACTOR  multiplies limits.decode_deadline_ms in the
#                    harness, for the slower instrumented build (2)
#   SHARED_DIR       also seed from $SHARED_DIR/fixtures/images (../shared)
#   AFL_*            passed to afl-fuzz as they are
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${1:-300}
CARGO_AFL_VERSION=0.18.2 # keep in step with `afl` in fuzz/Cargo.toml
SEED_MAX_BYTES=$((200 * 1024))
TOOLS=$ROOT/.deps/cargo-tools
TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}}
TARGET_DIR=${TARGET_DIR:-$ROOT/.deps/fuzz-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac # cargo runs in fuzz/
WORK=${FUZZ_WORK:-$ROOT/fuzz/work}
SHARED_DIR=${SHARED_DIR:-$ROOT/../shared}
JOBS=(${FUZZ_JOBS:+-j "$FUZZ_JOBS"})

say() { echo "fuzz: $*" >&2; }
case $DURATION in '' | *[!0-9]*) say "SECONDS must be a whole number, not '$DURATION'"; exit 2 ;; esac

# cargo-afl keeps AFL++ and its runtime under $XDG_DATA_HOME/afl.rs.
export XDG_DATA_HOME=$ROOT/.deps/afl-data
export PATH=$TOOLS/bin:$PATH

# --- the tool: cargo-afl and AFL++, once ------------------------------------
if [ "$("$TOOLS/bin/cargo-afl" afl --version 2>/dev/null | awk '{print $2}')" != "$CARGO_AFL_VERSION" ]; then
  say "installing cargo-afl $CARGO_AFL_VERSION into .deps/cargo-tools (it builds AFL++ too)"
  cargo install --root "$TOOLS" --locked --version "$CARGO_AFL_VERSION" "${JOBS[@]}" cargo-afl
fi
# The install builds AFL++ for the current rustc; build it here where that
# did not happen (a newer rustc since). "already built" is the usual answer.
if ! out=$(cargo afl config --build 2>&1); then
  case $out in *"already built"*) ;; *) echo "$out" >&2; exit 1 ;; esac
fi

# --- the target ---------------------------------------------------------------
# clang with coverage on libjpeg-turbo's sources (fuzz/cc-cov.sh), so JPEG
# paths inside the C decoder count as new coverage too.
if command -v "${FUZZ_CLANG:-clang}" >/dev/null; then
  export CC=$ROOT/fuzz/cc-cov.sh
else
  say "no clang: libjpeg-turbo is built without coverage (only the Rust code guides the fuzzer)"
fi
say "building fuzz/ (target decode) in $TARGET_DIR"
(cd fuzz && CARGO_TARGET_DIR=$TARGET_DIR cargo afl build --release --locked "${JOBS[@]}" --bin decode)
BIN=$TARGET_DIR/release/decode
export MMGATE_FUZZ_DEADLINE_FACTOR=${FUZZ_DEADLINE_FACTOR:-2}

# --- the corpus ---------------------------------------------------------------
case $WORK in / | "$ROOT" | "$HOME") say "FUZZ_WORK=$WORK would be wiped; pick a folder of its own"; exit 2 ;; esac
rm -rf "$WORK"
mkdir -p "$WORK/seeds"
add_seed() { # file: copied once per content, if it is small enough
  local f=$1 h
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -le "$SEED_MAX_BYTES" ] || return 0
  h=$(sha256sum <"$f" | cut -c1-12)
  compgen -G "$WORK/seeds/$h-*" >/dev/null || cp "$f" "$WORK/seeds/$h-$(basename "$f")"
}
for f in tests/fixtures/images/* "$SHARED_DIR"/fixtures/images/*; do
  case $f in *.jpg | *.jpeg | *.png | *.gif | *.webp | *.bmp) add_seed "$f" ;; esac
done
# Tiny files run hundreds of times faster than photos: one photo, 24×16, in
# each format and the pixel layouts the decoders branch on.
if command -v ffmpeg >/dev/null; then
  tiny=$WORK/tiny && mkdir -p "$tiny"
  for spec in jpg:yuvj420p jpg:yuvj444p png:rgb24 png:rgba png:gray \
    png:pal8 png:rgb48be png:gray16be gif:pal8 bmp:bgr24 webp:yuv420p webp:bgra; do
    ext=${spec%%:*} pix=${spec#*:}
    extra=() && [ "$spec" = webp:bgra ] && extra=(-lossless 1)
    ffmpeg -hide_banner -loglevel error -nostdin -y -i tests/fixtures/images/coffee.jpg \
      -vf scale=24:16 -frames:v 1 -pix_fmt "$pix" "${extra[@]}" "$tiny/tiny-$pix.$ext" 2>/dev/null \
      && add_seed "$tiny/tiny-$pix.$ext" || say "skipped tiny seed $spec (ffmpeg could not write it)"
  done
fi
# A seed that already breaks the contract is a finding; afl-fuzz would only
# refuse to start.
bad=0
for f in "$WORK"/seeds/*; do
  if ! "$BIN" <"$f" >"$WORK/seed.log" 2>&1; then
    say "seed $f crashes the target: $(grep -m1 -A1 panicked "$WORK/seed.log" | tail -1)"
    bad=1
  fi
done
[ "$bad" = 0 ] || exit 1
say "$(ls "$WORK/seeds" | wc -l) seeds in $WORK/seeds"

# --- the run ------------------------------------------------------------------
# A hang is a run past the harness's own deadline, plus 1 s for the canary.
TIMEOUT_MS=$(("$("$BIN" --deadline-ms)" + 1000))
export AFL_SKIP_CPUFREQ=${AFL_SKIP_CPUFREQ:-1}
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=${AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES:-1}
[ -t 1 ] || export AFL_NO_UI=${AFL_NO_UI:-1}
say "fuzzing for ${DURATION}s (hang timeout ${TIMEOUT_MS} ms); findings in $WORK/out"
set +e
# No backtraces in the loop: a decoder panic that preprocess contains would
# pay for one at every execution (the replays below keep the user's setting).
RUST_BACKTRACE=0 cargo afl fuzz -i "$WORK/seeds" -o "$WORK/out" -t "$TIMEOUT_MS" -x fuzz/decode.dict \
  -V "$DURATION" -- "$BIN"
rc=$?
set -e
stats=$WORK/out/default/fuzzer_stats
[ -f "$stats" ] || { say "afl-fuzz exited with $rc and wrote no stats"; exit 1; }
stat_of() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$stats"; }
say "$(stat_of execs_done) execs ($(stat_of execs_per_sec)/s), $(stat_of corpus_count) paths," \
  "edges $(stat_of edges_found)/$(stat_of total_edges) ($(stat_of bitmap_cvg)), stability $(stat_of stability)," \
  "$(stat_of saved_crashes) crashes, $(stat_of saved_hangs) hangs"

findings=0
for f in "$WORK"/out/default/crashes/id:* "$WORK"/out/default/hangs/id:*; do
  [ -f "$f" ] || continue
  findings=$((findings + 1))
  why="ran past ${TIMEOUT_MS} ms"
  if [[ $f == */crashes/* ]]; then
    if "$BIN" <"$f" >"$WORK/replay.log" 2>&1; then
      why="does not crash on its own (state left by earlier inputs of the persistent loop?)"
    else
      why=$(grep -m1 -A1 panicked "$WORK/replay.log" | tail -1)
      why=${why:-"no panic: killed by a signal (run it under gdb)"}
    fi
  fi
  echo "FOUND $f: $why"
done
if [ "$findings" -gt 0 ]; then
  say "$findings crashing or hanging inputs (above); reproduce one with: $BIN < FILE"
  exit 1
fi
[ "$rc" = 0 ] || { say "afl-fuzz exited with $rc"; exit 1; }
say "no crash and no hang"
