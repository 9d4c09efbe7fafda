/* Linked by cc-cov.sh into the programs libjpeg-turbo's build links itself
 * (cjpeg, djpeg, tjbench, ...), whose objects carry coverage guards but no
 * AFL++ runtime; weak, so AFL++'s runtime wins wherever both are present.
 * The fuzz target never links this: it gets AFL++'s runtime from cargo-afl. */
#include <stdint.h>

__attribute__((weak)) void __sanitizer_cov_trace_pc_guard(uint32_t *guard) { (void)guard; }

__attribute__((weak)) void __sanitizer_cov_trace_pc_guard_init(uint32_t *start, uint32_t *stop) {
  (void)start;
  (void)stop;
}
