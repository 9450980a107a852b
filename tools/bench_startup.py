#!/usr/bin/env python3
"""Start-up, side by side in one invocation: how fast capacity arrives when a replica starts.
Not a test: the numbers depend on the machine.

    python tools/bench_startup.py --model DIR [--runs 3] [--steps 20] [--image IMG]
        [--prompt "a photo of"] [--binary target/release/blip2-server] [--server-args ...]
        [--compare-args "--mmap false"] [--compare-binary BIN] [--no-transformers]
        [--out results.json]

Per run, in this order, each in a fresh process:
  1. read: every *.safetensors file of --model read once, sequentially, in 64 MiB pieces, after
     a first read that puts them in the page cache (the floor: what reading the weights costs
     when the disk is out of the picture). Before each of the starts below the files are read
     again, untimed, so each starts with them cached even when the one before evicted some (a
     copy of a checkpoint that fills most of RAM pushes its own files out).
  2. ours: `blip2-server serve` started; seconds to the first 200 from GET /ready; then the
     first caption (what the first user waits once the replica is ready), a second one (warm),
     the process's peak RSS (VmHWM), and start-to-first-caption.
  3. ours again with --compare-args added, or --compare-binary (another build) instead of
     --binary, when either is given: the same figures.
  4. transformers (unless --no-transformers): a fresh Python that imports torch and
     transformers, loads the model (from_pretrained, f32) and captions once; its import, load,
     first caption and process-start-to-first-caption.
Medians over --runs are printed as a table and written to --out as JSON.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PORT = 38790


def shard_files(model):
    return sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))


def read_files(files):
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - t, total


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def caption(args):
    with open(args.image, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    body = json.dumps({"image": image, "prompt": args.prompt,
                       "parameters": {"max_new_tokens": args.steps, "min_new_tokens": args.steps}})
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/caption", data=body.encode(),
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t


def ours(args, extra, binary):
    cmd = [binary, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(PORT),
           "--image-cache-size", "0"] + args.server_args.split() + extra.split()
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ready", timeout=2)
                break
            except Exception:
                if server.poll() is not None:
                    sys.exit(f"the server exited: {' '.join(cmd)}")
                time.sleep(0.01)
        ready = time.perf_counter() - start
        first = caption(args)
        second = caption(args)
        return {"ready_s": ready, "first_caption_s": first, "second_caption_s": second,
                "start_to_first_caption_s": ready + first, "peak_rss": peak_rss(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=120)


REFERENCE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from PIL import Image
t1 = time.perf_counter()
model = Blip2ForConditionalGeneration.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
processor = Blip2Processor.from_pretrained(sys.argv[1])
t2 = time.perf_counter()
steps = int(sys.argv[4])
with torch.inference_mode():
    inputs = processor(images=Image.open(sys.argv[2]).convert("RGB"), text=sys.argv[3], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_caption_s": t3 - t2,
                  "transformers": transformers.__version__, "torch": torch.__version__}))
"""


def reference(args):
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", REFERENCE, args.model, args.image, args.prompt, str(args.steps)],
                       capture_output=True, text=True)
    total = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(p.stderr)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["start_to_first_caption_s"] = total
    return out


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default=os.path.join(ROOT, "tests/fixtures/images/photo_320x240.jpg"))
    ap.add_argument("--prompt", default="a photo of")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "blip2-server"))
    ap.add_argument("--server-args", default="", help="added to every start of ours")
    ap.add_argument("--compare-args", default=None, help="a second configuration of ours, e.g. '--mmap false'")
    ap.add_argument("--compare-binary", default=None, help="a second build of ours")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    files = shard_files(args.model)
    results = {"read": [], "ours": [], "compare": [], "transformers": []}
    for run in range(args.runs):
        read_files(files)  # into the page cache
        seconds, total = read_files(files)
        results["read"].append({"read_s": seconds, "bytes": total, "gb_per_s": total / seconds / 1e9})
        read_files(files)
        results["ours"].append(ours(args, "", args.binary))
        if args.compare_args is not None or args.compare_binary:
            read_files(files)
            results["compare"].append(ours(args, args.compare_args or "", args.compare_binary or args.binary))
        if not args.no_transformers:
            read_files(files)
            results["transformers"].append(reference(args))
        print(f"run {run + 1}/{args.runs}: {json.dumps({k: v[-1] for k, v in results.items() if v})}",
              file=sys.stderr)

    read_s = median(results["read"], "read_s")
    print(f"weights: {results['read'][0]['bytes'] / 1e9:.2f} GB in {len(files)} files; "
          f"read from the page cache in {read_s:.2f} s ({median(results['read'], 'gb_per_s'):.1f} GB/s)\n")
    print("| (median of %d) | to /ready (s) | x read | first caption (s) | second caption (s) "
          "| start to first caption (s) | peak RSS (GiB) |" % args.runs)
    print("| --- | --- | --- | --- | --- | --- | --- |")
    compare = args.compare_binary or ""
    for label, key in [(f"ours {args.server_args}".strip(), "ours"),
                       (f"ours {compare} {args.server_args} {args.compare_args or ''}".strip(), "compare")]:
        rows = results[key]
        if not rows:
            continue
        ready = median(rows, "ready_s")
        print(f"| {label} | {ready:.2f} | {ready / read_s:.2f} | {median(rows, 'first_caption_s'):.2f} "
              f"| {median(rows, 'second_caption_s'):.2f} | {median(rows, 'start_to_first_caption_s'):.2f} "
              f"| {median(rows, 'peak_rss') / 2**30:.2f} |")
    if results["transformers"]:
        rows = results["transformers"]
        print(f"\ntransformers {rows[0]['transformers']} (torch {rows[0]['torch']}, f32): import "
              f"{median(rows, 'import_s'):.2f} s, load {median(rows, 'load_s'):.2f} s, first caption "
              f"{median(rows, 'first_caption_s'):.2f} s; process start to first caption "
              f"{median(rows, 'start_to_first_caption_s'):.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
