#!/usr/bin/env python3
"""transformers on a GPU, on the shapes `examples/bench` times: the peer of our CUDA rows in
tools/device_check.sh. Random weights built on the device from DIR's config.json (as
`examples/bench --random-weights` does), so no checkpoint has to travel; the docs' recipe
(`torch_dtype=torch.float16`, on cuda). Not a test: the numbers depend on the machine.

    python tools/bench_gpu_transformers.py --model DIR [--device cuda] [--dtype float16]
        [--runs 3] [--steps 20] [--batch 8 32] [--vision-batch 8] [--out results.json]

Phases, each a median over --runs, every span closed by torch.cuda.synchronize(): the vision
encoder at batch 1 and --vision-batch, Q-Former + projection, prefill and the decode step at
batch 1 and at each --batch (forward hooks on the language model inside a real generate()),
and one caption end to end (preprocessing included) with --steps new tokens forced.
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

from bench_vs_transformers import time_modules  # this script's folder is on sys.path


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device, dtype):
    config = Blip2Config.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    return model.to(dtype).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a directory with config.json and the processor files")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--image", default="tests/fixtures/images/photo_320x240.jpg")
    ap.add_argument("--prompt", default="a photo of")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--vision-batch", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    t = time.perf_counter()
    model = build(args, device, dtype)
    sync(device)
    load_s = time.perf_counter() - t
    processor = Blip2Processor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")

    spans = {}
    time_modules(model, spans, sync=lambda: sync(device))
    span = lambda name, i=0: spans[name][i][1] - spans[name][i][0]

    def generate(batch):
        inputs = processor(images=[image] * batch, text=[args.prompt] * batch, return_tensors="pt", padding=True)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        return model.generate(**inputs, max_new_tokens=args.steps, min_new_tokens=args.steps)

    phases = {}
    with torch.inference_mode():
        generate(1)  # warm-up: cuBLAS handles, kernels' first launch
        for _ in range(args.runs):
            for batch in [1] + args.batch:
                spans.clear()
                sync(device)
                t0 = time.perf_counter()
                generate(batch)
                sync(device)
                t1 = time.perf_counter()
                lm = spans["lm"]
                suffix = "" if batch == 1 else f"_b{batch}"
                if batch == 1:
                    phases.setdefault("caption_s", []).append(t1 - t0)
                    phases.setdefault("vision_s", []).append(span("vision"))
                    phases.setdefault("qformer_s", []).append(span("qformer") + span("projection"))
                phases.setdefault(f"prefill{suffix}_s", []).append(lm[0][1] - lm[0][0])
                phases.setdefault(f"decode_step{suffix}_s", []).append(statistics.median(e - s for s, e in lm[1:]))
            if args.vision_batch > 1:
                pixels = processor(images=[image] * args.vision_batch, return_tensors="pt")["pixel_values"]
                pixels = pixels.to(device, dtype)
                sync(device)
                t0 = time.perf_counter()
                model.vision_model(pixel_values=pixels)
                sync(device)
                phases.setdefault("vision_batch_s", []).append(time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in phases.items()}
    result.update({
        "side": "transformers",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "load_s": load_s,
        "batches": args.batch,
        "vision_batch": args.vision_batch,
        "steps": args.steps,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    })
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
