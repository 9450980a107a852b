#!/usr/bin/env python3
"""16-bit PNGs and what Pillow makes of them (`Image.open(p).convert("RGB")`).

Pillow opens 16-bit grey as mode I;16 and clips it to 255 on the way to RGB; 16-bit RGB, RGBA and
grey+alpha keep the high byte. These files pin that behaviour for the Rust decoder.

    python tools/make_png16_fixtures.py [--out tests/fixtures/png16]
"""
import argparse
import os
import struct
import zlib

import numpy as np
import PIL
from PIL import Image

assert PIL.__version__ == "13.0.0", PIL.__version__


def write_png16(path, arr, colortype):
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colortype, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "png16"))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(16)
    # Grey mixes small values (kept) and large ones (clipped) so both sides of the clip show.
    grey = np.where(rng.random((9, 11)) < 0.5, rng.integers(0, 256, (9, 11)), rng.integers(0, 65536, (9, 11)))
    cases = {
        "gray16": (grey.astype(np.uint16), 0),
        "rgb16": (rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16), 2),
        "graya16": (rng.integers(0, 65536, (9, 11, 2), dtype=np.uint16), 4),
        "rgba16": (rng.integers(0, 65536, (9, 11, 4), dtype=np.uint16), 6),
    }
    for name, (arr, colortype) in cases.items():
        src = os.path.join(out, f"{name}.png")
        write_png16(src, arr, colortype)
        Image.open(src).convert("RGB").save(os.path.join(out, f"{name}.pil-rgb.png"))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
