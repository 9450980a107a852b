#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/), small and deterministic,
from the test fixtures: a few valid inputs of each kind for libFuzzer to mutate. Standard
library only. Run from anywhere; rerun after changing a fixture or a target's input layout
(fuzz/src/lib.rs says each target's layout)."""

import base64
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "corpus"
BOUNDARY = "fuzzboundary"  # fuzz/src/lib.rs MULTIPART_BOUNDARY

IMAGES = [
    FIX / "images" / n
    for n in [
        "cmyk_48x40.jpg",
        "rgba_100x37.png",
        "lossless_50x60.webp",
        "gray_13x200.png",
        "anim_40x30.gif",
        "palette_64x64.png",
        "tiny_5x7.bmp",
    ]
] + [FIX / "png16" / n for n in ["gray16.png", "graya16.png", "rgb16.png", "rgba16.png"]]


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def image():
    for i, path in enumerate(IMAGES):
        # The first byte picks the output size (lib.rs `image`): the processor's and others.
        write("image", path.name, bytes([i % 4]) + path.read_bytes())


def small_png_b64():
    return base64.b64encode((FIX / "images" / "palette_64x64.png").read_bytes()).decode()


def json_body():
    img = small_png_b64()
    bodies = {
        0: [  # /v1/caption
            {"image": img},
            {"image": img, "prompt": "a photo of", "parameters": {"max_new_tokens": 3}},
            {"images": [img, img], "parameters": {"num_beams": 2, "num_return_sequences": 2}},
            {"image": img, "stream": True, "parameters": {"do_sample": True, "seed": 7,
                                                          "top_k": 5, "details": True}},
            {"image": img, "image_size": [14, 28], "parameters": {"stop": ["a"]}},
        ],
        1: [  # /v1/vqa
            {"image": img, "question": "what is it?"},
            {"image": img, "questions": ["what?", "where?"]},
            {"image": "data:image/png;base64," + img, "question": "é 日本 🙂?", "stream": True},
        ],
        2: [  # /v1/chat/completions
            {"model": "blip2", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}}]}]},
            {"model": "blip2", "stream": True, "logprobs": True,
             "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}}]}]},
        ],
        3: [  # /v1/features
            {"image": img, "stage": "qformer"},
            {"images": [img], "stage": "projected", "encoding_format": "base64"},
            {"image": img, "stage": "vision_pooled", "image_size": 28},
        ],
    }
    for route, items in bodies.items():
        for i, body in enumerate(items):
            write("json_body", f"route{route}-{i}.json", bytes([route]) + json.dumps(body).encode())


def multipart(fields):
    parts = []
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n"
        if filename:
            head += "Content-Type: application/octet-stream\r\n"
        parts.append(head.encode() + b"\r\n" + value + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def multipart_body():
    png = (FIX / "images" / "palette_64x64.png").read_bytes()
    bmp = (FIX / "images" / "tiny_5x7.bmp").read_bytes()
    cases = {
        0: [  # /v1/caption
            [("image", png, "a.png"), ("prompt", b"a photo of", None),
             ("max_new_tokens", b"3", None)],
            [("image", png, "a.png"), ("image", bmp, "b.bmp"), ("stop", b"a", None),
             ("stop", b"b", None), ("image_size", b"14x28", None)],
            [("image", png, "a.png"), ("parameters", b'{"num_beams": 2}', None),
             ("stream", b"false", None)],
        ],
        1: [  # /v1/vqa
            [("image", png, "a.png"), ("question", b"what is it?", None),
             ("stream", b"true", None)],
        ],
        2: [  # /v1/features
            [("image", png, "a.png"), ("stage", b"qformer", None),
             ("encoding_format", b"base64", None)],
        ],
    }
    for route, items in cases.items():
        for i, fields in enumerate(items):
            write("multipart_body", f"route{route}-{i}", bytes([route]) + multipart(fields))


def gpt2_byte_tokens(vocab):
    """Token ids of single bytes in a byte-level BPE vocabulary (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: vocab[chr(c)] for b, c in zip(bs, cs) if chr(c) in vocab}


def detok():
    vocab = json.loads((FIX / "models" / "opt-tiny" / "vocab.json").read_text())
    byte_ids = gpt2_byte_tokens(vocab)
    text = "héllo 日本 🙂 a"
    # Multi-byte characters spelled a byte per token: the decoder must hold them back.
    ids = [byte_ids[b] for b in text.encode()]
    write("detok", "opt-bytes", bytes([0]) + b"".join(struct.pack("<H", i) for i in ids))
    ids = list(range(0, len(vocab) + 4))  # every id, special ones and a few past the end
    write("detok", "opt-all", bytes([0]) + b"".join(struct.pack("<H", i) for i in ids))
    t5 = json.loads((FIX / "models" / "t5-tiny" / "tokenizer.json").read_text())
    n = len(t5["model"]["vocab"])
    write("detok", "t5-all", bytes([1]) + b"".join(struct.pack("<H", i) for i in range(n + 4)))


def safetensors_file(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors():
    f32 = struct.pack("<6f", *range(6))
    write("safetensors", "f32", safetensors_file({"w": ("F32", [2, 3], f32)}, {"format": "pt"}))
    write("safetensors", "mixed", safetensors_file({
        "a.weight": ("F16", [2, 2], b"\x00\x3c" * 4),
        "a.bias": ("BF16", [2], b"\x80\x3f" * 2),
        "ids": ("I64", [3], struct.pack("<3q", 1, 2, 3)),
        "mask": ("U8", [4], b"\x00\x01\x00\x01"),
        "n": ("U32", [1], struct.pack("<I", 9)),
        "d": ("F64", [1], struct.pack("<d", 0.5)),
        "empty": ("F32", [0, 4], b""),
        "scalar": ("F32", [], struct.pack("<f", 1.0)),
    }))
    write("safetensors", "no-tensors", safetensors_file({}))


def shard_index():
    shard = "model-00001-of-00001.safetensors"  # lib.rs `shard_index` writes this shard
    header = json.loads((FIX / "models" / "opt-tiny" / "model.safetensors").read_bytes()[8:][
        :struct.unpack("<Q", (FIX / "models" / "opt-tiny" / "model.safetensors").read_bytes()[:8])[0]])
    names = sorted(k for k in header if k != "__metadata__")[:6]
    write("shard_index", "valid", json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {n: shard for n in names}}, indent=1))
    write("shard_index", "missing-shard", json.dumps(
        {"weight_map": {names[0]: shard, names[1]: "model-00002-of-00002.safetensors"}}))


if __name__ == "__main__":
    if OUT.exists():
        shutil.rmtree(OUT)
    for make in (image, json_body, multipart_body, detok, safetensors, shard_index):
        make()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    count = sum(1 for p in OUT.rglob("*") if p.is_file())
    print(f"{count} seeds, {total} bytes, in {OUT.relative_to(ROOT)}")
