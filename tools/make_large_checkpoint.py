#!/usr/bin/env python3
"""Write a random-weight checkpoint of a real BLIP-2 architecture in the Hub layout.

The tensor names and shapes come from transformers' own model built on the meta device, so the
file is what `save_pretrained` would write for the real model; the values are random (the Hub
cannot be reached here). Shards are streamed one tensor at a time, so RAM stays small whatever
the model size.

    python tools/make_large_checkpoint.py --arch opt-2.7b --out /tmp/blip2-opt-2.7b-random
    python tools/make_large_checkpoint.py --arch flan-t5-xl --out /tmp/blip2-flan-t5-xl-random

The tokenizer is copied from a tiny fixture (its ids all fall inside the real vocabulary);
`image_token_index` stays the real one, which is all the model side reads.

With --shapes-only no weights are written: `tensor_shapes.json` lists every tensor's name and
shape instead, and `examples/bench --random-weights` builds the model from random values on its
device (a 15 GB checkpoint need not travel to a GPU machine to be timed there).
"""
import argparse
import json
import os
import shutil
import struct
import zlib

import numpy as np
import torch
import transformers
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

ARCHS = {
    # Salesforce/blip2-opt-2.7b
    "opt-2.7b": dict(
        text=lambda: OPTConfig(
            vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
            num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
            eos_token_id=50118, bos_token_id=2, pad_token_id=1,
        ),
        image_token_index=50265,
        tokenizer_from="opt-tiny",
    ),
    # A mid-size checkpoint for decode benchmarks: OPT-350m-sized decoder (pre-LN), ViT-L-sized
    # vision tower. Not a released model.
    "opt-mid": dict(
        text=lambda: OPTConfig(
            vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
            num_attention_heads=16, max_position_embeddings=2048, word_embed_proj_dim=1024,
            eos_token_id=50118, bos_token_id=2, pad_token_id=1,
        ),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        qformer=dict(encoder_hidden_size=1024),
        image_token_index=50265,
        tokenizer_from="opt-tiny",
    ),
    # Salesforce/blip2-flan-t5-xl
    "flan-t5-xl": dict(
        text=lambda: T5Config(
            vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
            num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
            dense_act_fn="gelu", tie_word_embeddings=False, decoder_start_token_id=0,
            eos_token_id=1, pad_token_id=0,
        ),
        image_token_index=32100,
        tokenizer_from="t5-tiny",
    ),
}

SHARD_BYTES = 5 * 1024**3


def tensor_names(arch):
    """The Blip2 config of `arch` and every tensor's name and shape, as save_pretrained writes
    them (tied tensors dropped)."""
    spec = ARCHS[arch]
    text = spec["text"]()
    config = Blip2Config(
        vision_config=spec.get("vision", {}), qformer_config=spec.get("qformer", {}),
        text_config=text.to_dict(), num_query_tokens=32,
        image_token_index=spec["image_token_index"],
    )
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    names = {}
    for name, p in model.state_dict(keep_vars=True).items():
        names[name] = tuple(p.shape)
    # save_pretrained drops tensors that share storage with another; mirror it for the OPT head.
    if config.text_config.tie_word_embeddings and "language_model.lm_head.weight" in names:
        names.pop("language_model.lm_head.weight")
    for key in list(names):
        if key.endswith("encoder.embed_tokens.weight") or key.endswith("decoder.embed_tokens.weight"):
            if arch == "flan-t5-xl":
                names.pop(key)  # tied to `shared`
    return config, names


def plan_shards(names):
    """Tensor names (sorted) split into shards of at most SHARD_BYTES."""
    shards, current, size = [], [], 0
    for name in sorted(names):
        n = int(np.prod(names[name])) * 4
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    return shards


def random_block():
    """The values every tensor is cut from: 2^20 draws of N(0, 0.02^2)."""
    return np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * 0.02


def tensor_chunks(name, j, count, block):
    """The values of tensor `name`, `j`-th in its shard, in chunks: norm weights are ones, every
    other tensor a window of the block rolled by an amount from its name and place."""
    if "norm" in name.lower() and name.endswith(".weight"):
        yield np.ones(count, dtype=np.float32)
        return
    shift = zlib.crc32(name.encode()) % 1000 + j
    written = 0
    while written < count:
        k = min(count - written, block.size)
        yield np.roll(block, shift + written)[:k]
        written += k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(ARCHS), default="opt-2.7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes-only", action="store_true", help="write tensor_shapes.json, not the weights")
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = ap.parse_args()
    spec = ARCHS[args.arch]
    config, names = tensor_names(args.arch)
    os.makedirs(args.out, exist_ok=True)
    config.save_pretrained(args.out)
    if args.shapes_only:
        with open(os.path.join(args.out, "tensor_shapes.json"), "w") as f:
            json.dump({k: list(v) for k, v in sorted(names.items())}, f, indent=0)
        copy_processor(args, spec)
        print(f"{len(names)} tensor shapes; transformers {transformers.__version__}")
        return

    shards = plan_shards(names)
    block = random_block()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in shard:
            n = int(np.prod(names[name])) * 4
            header[name] = {"dtype": "F32", "shape": list(names[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
        with open(os.path.join(args.out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for j, name in enumerate(shard):
                for chunk in tensor_chunks(name, j, int(np.prod(names[name])), block):
                    f.write(chunk.tobytes())
        total += offset
        print(f"wrote {fname} ({offset / 1e9:.2f} GB)", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_processor(args, spec)
    print(f"total {total / 1e9:.2f} GB in {len(shards)} shards; transformers {transformers.__version__}")


def copy_processor(args, spec):
    """The tokenizer and image processor files, from the tiny fixture."""
    src = os.path.join(args.fixtures, "models", spec["tokenizer_from"])
    if not os.path.isdir(src):
        print(f"no tokenizer copied: {src} does not exist (run tools/make_fixtures.py first)")
        return
    for fname in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        if os.path.exists(os.path.join(src, fname)):
            shutil.copy(os.path.join(src, fname), args.out)
    with open(os.path.join(src, "preprocessor_config.json")) as f:
        pre = json.load(f)
    pre["size"] = {"height": 224, "width": 224}
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)


if __name__ == "__main__":
    main()
