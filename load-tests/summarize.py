"""Prints the medians of a load-tests/run.sh result folder as Markdown.

Every ratio is paired per round (each system against the ceiling or the
other system measured in the same round), then the median is taken.
"""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
med = statistics.median


def pick(system, f, conc=None):
    r = [x for x in rows if x["system"] == system and x["file"] == f
         and (conc is None or x["concurrency"] == conc)]
    return {x["round"]: x for x in r}


def paired(a, b, fn):
    return med(fn(a[k], b[k]) for k in a if k in b)


print(f"results: {out}\n")
files = list(dict.fromkeys(r["file"] for r in rows))
concs = sorted({r["concurrency"] for r in rows if "concurrency" in r})
print("### Ceilings (one process, every core)\n")
print("| image | engine | img/s | 1-image p50 ms |")
print("|---|---|---|---|")
for f in files:
    for b in ("openvino", "onnxruntime-cpu"):
        c = pick(f"ceiling-{b}", f)
        prec = next(iter(c.values())).get("precision", "")
        print(f"| {f} | {b} {prec} | {med(x['throughput_per_s'] for x in c.values()):.1f} "
              f"| {med(x['single_p50_ms'] for x in c.values()):.2f} |")
print("\n### End to end\n")
print("| image | conc | mmgate OpenVINO img/s | p50 / p99 ms | mmgate ONNX Runtime img/s | p50 / p99 ms "
      "| FastAPI + OpenVINO bf16 img/s | p50 / p99 ms | OV ÷ ORT | OV ÷ ceiling-OV | OV ÷ FastAPI "
      "| OV p50 − ceiling 1-image p50 ms | peak PSS MiB (mmgate OV / FastAPI) | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in files:
    ceil = pick("ceiling-openvino", f)
    for c in concs:
        ov, ort, alt = (pick(s, f, c) for s in ("openvino", "onnxruntime", "alternative"))
        tp = lambda d: med(x["throughput_per_s"] for x in d.values())
        lat = lambda d: f"{med(x['p50_ms'] for x in d.values()):.1f} / {med(x['p99_ms'] for x in d.values()):.1f}"
        r = lambda a, b: paired(a, b, lambda x, y: x["throughput_per_s"] / y["throughput_per_s"])
        dp50 = paired(ov, ceil, lambda x, y: x["p50_ms"] - y["single_p50_ms"])
        pss = lambda d: max(x["peak_tree_pss_mib"] for x in d.values())
        err = sum(x["errors"] for d in (ov, ort, alt) for x in d.values())
        print(f"| {f} | {c} | {tp(ov):.1f} | {lat(ov)} | {tp(ort):.1f} | {lat(ort)} | {tp(alt):.1f} | {lat(alt)} "
              f"| {r(ov, ort):.2f} | {r(ov, ceil):.2f} | {r(ov, alt):.2f} | {dp50:+.2f} "
              f"| {pss(ov):.0f} / {pss(alt):.0f} | {err} |")
