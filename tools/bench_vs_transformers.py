#!/usr/bin/env python3
"""One caption, side by side: transformers (f32, torch.inference_mode, all cores) and this
project's `generate`, on the same checkpoint directory, image and prompt, 20 new tokens forced.

    python tools/bench_vs_transformers.py --model DIR --image IMG [--prompt "a photo of"]
        [--binary target/release/blip2-server] [--runs 1]

Prints load time, generate time (median of --runs) and peak RSS for each, and the ratio. Each side
runs in its own process so peak RSS is its own. Not a test: numbers depend on the machine.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def reference(args):
    import torch
    import transformers
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(args.model)
    load = time.perf_counter() - t
    times, tokens = [], None
    for _ in range(args.runs):
        t = time.perf_counter()
        with torch.inference_mode():
            image = Image.open(args.image).convert("RGB")
            inputs = processor(images=image, text=args.prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20)
        times.append(time.perf_counter() - t)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": load, "generate_s": statistics.median(times), "peak_rss": rss,
                      "tokens": tokens, "transformers": transformers.__version__, "torch": torch.__version__}))


def ours(args):
    cmd = [args.binary, "generate", "--model", args.model, "--image", args.image, "--prompt", args.prompt,
           "--max-new-tokens", "20", "--min-new-tokens", "20", "--json"]
    times, load, tokens = [], None, None
    rss = 0
    for _ in range(args.runs):
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "RSS_KB=%M"] + cmd, capture_output=True, text=True,
                           env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
        if p.returncode != 0:
            sys.exit(p.stderr)
        err = re.sub(r"\x1b\[[0-9;]*m", "", p.stderr)
        load = float(re.search(r"model loaded.*?seconds=([0-9.]+)", err).group(1))
        times.append(float(re.search(r"generated.*?seconds=([0-9.]+)", err).group(1)))
        rss = max(rss, int(re.search(r"RSS_KB=(\d+)", err).group(1)) * 1024)
        tokens = json.loads(p.stdout.splitlines()[0])["token_ids"]
    return {"load_s": load, "generate_s": statistics.median(times), "peak_rss": rss, "tokens": tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="a photo of")
    ap.add_argument("--binary", default=os.path.join(HERE, "..", "target", "release", "blip2-server"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_only:
        return reference(args)
    p = subprocess.run([sys.executable, __file__, "--reference-only"] + sys.argv[1:], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr)
    ref = json.loads(p.stdout.strip().splitlines()[-1])
    mine = ours(args)
    gib = 1024 ** 3
    print(f"| | load (s) | generate 20 tokens (s) | peak RSS (GiB) |")
    print(f"| --- | --- | --- | --- |")
    print(f"| transformers {ref['transformers']} / torch {ref['torch']} f32 | {ref['load_s']:.1f} | {ref['generate_s']:.2f} | {ref['peak_rss'] / gib:.2f} |")
    print(f"| blip2-server f32 | {mine['load_s']:.1f} | {mine['generate_s']:.2f} | {mine['peak_rss'] / gib:.2f} |")
    print(f"generate time ratio (ours / transformers): {mine['generate_s'] / ref['generate_s']:.2f}")
    print(f"same tokens: {mine['tokens'] == ref['tokens']}")


if __name__ == "__main__":
    main()
