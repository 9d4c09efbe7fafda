#!/bin/sh
# C compiler for the fuzz build (scripts/fuzz.sh sets CC to this): clang,
# with SanitizerCoverage guards (the same hooks rustc emits for afl.rs, fed
# into AFL++'s map by its runtime) on libjpeg-turbo's own sources, so the
# fuzzer sees coverage inside the JPEG decoder. Everything else (CMake's
# compiler checks, build-script probes that are linked and run without
# AFL++'s runtime) compiles plain. Links of objects (libjpeg-turbo's own
# tools) get no-op guard hooks (sancov-stub.c) so they still link.
cov= link=1 objects=
for a in "$@"; do
  case $a in
    */libjpeg-turbo/*.c) cov=-fsanitize-coverage=trace-pc-guard ;;
    -c | -E | -S | -M | -MM) link= ;;
    *.o) objects=1 ;;
  esac
done
stub=
[ -n "$link" ] && [ -n "$objects" ] && stub=$(dirname "$0")/sancov-stub.c
exec "${FUZZ_CLANG:-clang}" $cov "$@" ${stub:+"$stub"}
