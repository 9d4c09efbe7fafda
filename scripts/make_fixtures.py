#!/usr/bin/env python3
"""Generates the derived test images; its output is committed.

    .deps/venv/bin/python scripts/make_fixtures.py      (after scripts/setup.sh test)

Reads photos already in tests/fixtures/images/ (coffee.jpg, chelsea.png,
camera.png, astronaut_1536.jpg; copied from the shared test photos) and writes:
  images/  coffee_exif6.jpg chelsea_cmyk.jpg astronaut_16bit.png camera_gray16.png
           chelsea.webp coffee.bmp coffee_640.jpg
  bad/     empty.bin truncated.jpg random.bin text.txt claims_65000.jpg bomb_30000.png
Everything is deterministic.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
IMAGES, BAD = FIX / "images", FIX / "bad"


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_png(path: Path, width: int, height: int, bit_depth: int, color_type: int, rows) -> None:
    """Writes a PNG from an iterable of raw rows (no filter byte), streaming."""
    z = zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)))
        for row in rows:
            data = z.compress(b"\x00" + row)
            if data:
                f.write(png_chunk(b"IDAT", data))
        f.write(png_chunk(b"IDAT", z.flush()))
        f.write(png_chunk(b"IEND", b""))


def write_png16(path: Path, arr8: np.ndarray) -> None:
    """16-bit PNG (grey or RGB) holding v*257, i.e. exactly the 8-bit image scaled up."""
    arr = arr8.astype(">u2") * 257
    color_type = 2 if arr.ndim == 3 else 0
    write_png(path, arr.shape[1], arr.shape[0], 16, color_type, (r.tobytes() for r in arr))


def sof_offset(jpeg: bytes) -> int:
    """Offset of the first SOFn segment's marker (FF C0..CF but C4, C8, CC)."""
    i = 2
    while i + 4 <= len(jpeg):
        assert jpeg[i] == 0xFF, f"bad marker at {i}"
        marker = jpeg[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return i
        i += 2 + struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
    raise ValueError("no SOF marker")


def main() -> None:
    coffee = Image.open(IMAGES / "coffee.jpg").convert("RGB")
    chelsea = Image.open(IMAGES / "chelsea.png").convert("RGB")
    camera = Image.open(IMAGES / "camera.png")
    astronaut = Image.open(IMAGES / "astronaut_1536.jpg").convert("RGB")
    assert camera.mode == "L", camera.mode

    # Pixels stored rotated 90 degrees counter-clockwise; Orientation=6 says
    # "rotate 90 clockwise to display", so only an EXIF-aware decoder gets coffee upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    coffee.transpose(Image.Transpose.ROTATE_90).save(
        IMAGES / "coffee_exif6.jpg", quality=90, exif=exif.tobytes()
    )
    upright = ImageOps.exif_transpose(Image.open(IMAGES / "coffee_exif6.jpg"))
    assert upright.size == coffee.size, upright.size

    chelsea.convert("CMYK").save(IMAGES / "chelsea_cmyk.jpg", quality=90)
    chelsea.save(IMAGES / "chelsea.webp", lossless=True)
    coffee.resize((300, 200), Image.Resampling.LANCZOS).save(IMAGES / "coffee.bmp")
    coffee.resize((640, 480), Image.Resampling.LANCZOS).save(IMAGES / "coffee_640.jpg", quality=90)
    small = astronaut.resize((256, 256), Image.Resampling.LANCZOS)
    write_png16(IMAGES / "astronaut_16bit.png", np.asarray(small))
    write_png16(IMAGES / "camera_gray16.png", np.asarray(camera.resize((256, 256), Image.Resampling.LANCZOS)))

    BAD.mkdir(exist_ok=True)
    jpeg = (IMAGES / "coffee.jpg").read_bytes()
    (BAD / "empty.bin").write_bytes(b"")
    (BAD / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 4 // 10])
    (BAD / "random.bin").write_bytes(random.Random(20240601).randbytes(4096))
    (BAD / "text.txt").write_bytes(b"hello, this is not an image\n")
    # SOF segment: FF Cn, length(2), precision(1), height(2), width(2)
    sof = sof_offset(jpeg)
    patched = bytearray(jpeg)
    patched[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    (BAD / "claims_65000.jpg").write_bytes(bytes(patched))
    # Decompression bomb: a valid 30000x30000 all-black 8-bit grey PNG, ~1 MB on disk.
    n = 30000
    write_png(BAD / "bomb_30000.png", n, n, 8, 0, (bytes(n) for _ in range(n)))


if __name__ == "__main__":
    main()
