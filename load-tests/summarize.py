"""Prints the medians of a load-tests/run.sh result folder as Markdown."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
ceiling = [json.loads(l) for l in (out / "ceiling.jsonl").read_text().splitlines()]
mmgate = [json.loads(l) for l in (out / "mmgate.jsonl").read_text().splitlines()]
med = statistics.median

print(f"results: {out}\n")
print("| image | ceiling img/s (2 thr) | ceiling 1-image p50 ms | conc | mmgate img/s | ratio (paired median) | p50 ms | p99 ms | Δp50 vs ceiling 1-image (paired median) ms | peak tree PSS MiB | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in dict.fromkeys(r["file"] for r in ceiling):
    c = [r for r in ceiling if r["file"] == f]
    c_tp = med(r["throughput_per_s"] for r in c)
    c_lat = med(r["single_p50_ms"] for r in c)
    for conc in sorted({r["concurrency"] for r in mmgate}):
        m = [r for r in mmgate if r["file"] == f and r["concurrency"] == conc]
        tp = med(r["throughput_per_s"] for r in m)
        p50 = med(r["p50_ms"] for r in m)
        p99 = med(r["p99_ms"] for r in m)
        pss = max(r["peak_tree_pss_mib"] for r in m)
        # Side by side: each round's mmgate run against that round's ceiling.
        ratio = med(r["throughput_per_s"] / x["throughput_per_s"] for r, x in zip(m, c))
        dp50 = med(r["p50_ms"] - x["single_p50_ms"] for r, x in zip(m, c))
        err = sum(r["errors"] for r in m)
        print(f"| {f} | {c_tp:.1f} | {c_lat:.2f} | {conc} | {tp:.1f} | {ratio:.2f} | {p50:.2f} | {p99:.2f} | {dp50:+.2f} | {pss:.0f} | {err} |")
