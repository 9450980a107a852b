#!/usr/bin/env python3
"""Side-by-side benchmark: transformers (f32, torch.inference_mode, all cores) and this project,
in one invocation, on the same checkpoint, image and prompt, greedy with --steps new tokens
forced (min_new_tokens). Not a test: the numbers depend on the machine.

    python tools/bench_vs_transformers.py --model DIR [--image IMG] [--prompt "a photo of"]
        [--runs 3] [--steps 20] [--batch 8] [--quantize q8_0 q4k] [--pairs 3] [--peer-int8]
        [--out results.json]

Each side runs in its own process so that its peak RSS is its own:
  1. --pairs N (default 3) alternating pairs, each side in a fresh process after one warm-up
     request: transformers' generate() at batch --batch, then --batch concurrent requests to
     our server. The machine's speed drifts by up to 30% over minutes (BENCHMARKS.md), so the
     throughput ratio is taken within each pair, where both sides ran back to back, and the
     median of the pairs' ratios is reported. (The two cannot run side by side: each holds the
     whole model in memory.)
  2. transformers: load; per phase (preprocess, vision, Q-Former + projection, prefill, decode
     step) timed by forward hooks inside a real generate(); one caption end to end; generate()
     on a batch of --batch images.
  3. this project, `examples/bench` (release): the same phases, load, peak RSS, the machine's
     read bandwidth and matmul GFLOP/s, the decode floor; once per --quantize format too, with
     its logits drift against f32.
  4. this project's HTTP server (release binary) under 1, 2, 4 and --batch concurrent clients:
     requests/s, against transformers' offline generate() at batch --batch; and at --batch
     clients once per --quantize format.
--peer-int8 adds the int8 peer a Python user reaches for on a CPU: the same transformers model
with `torch.ao.quantization.quantize_dynamic` on every nn.Linear (qint8 weights, fbgemm), in
steps 1 (pairs against our first --quantize format's server) and 2, with its first-step logits
drift against transformers f32.
Build first: cargo build --release --bin blip2-server --example bench
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_reference(args):
    """transformers' model (f32; with --int8, every nn.Linear dynamically quantised) and processor."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    torch.set_num_threads(os.cpu_count())
    model = Blip2ForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    if args.int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model, Blip2Processor.from_pretrained(args.model)


def first_logits(model, processor, args):
    """First-step logits of the benchmark's image and prompt (for the drift of the int8 peer)."""
    from PIL import Image

    inputs = processor(images=Image.open(args.image).convert("RGB"), text=args.prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True, output_logits=True)
    return out.logits[0][0].tolist()


def time_modules(model, calls, sync=lambda: None):
    """Forward hooks that append [start, end] of every call of the vision model, the Q-Former,
    the projection and the language model to calls["vision" | "qformer" | "projection" | "lm"];
    `sync` runs before each clock read (a GPU's queue drained). Also used by
    bench_gpu_transformers.py."""

    def timed(name, module):
        def pre(_m, _inputs):
            sync()
            calls.setdefault(name, []).append([time.perf_counter(), None])

        def post(_m, _inputs, _out):
            sync()
            calls[name][-1][1] = time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    timed("vision", model.vision_model)
    timed("qformer", model.qformer)
    timed("projection", model.language_projection)
    timed("lm", model.language_model)


def reference(args):
    import torch
    import transformers
    from PIL import Image

    t = time.perf_counter()
    model, processor = load_reference(args)
    load = time.perf_counter() - t

    calls = {}
    time_modules(model, calls)
    phases = {k: [] for k in ["preprocess_s", "vision_s", "qformer_s", "prefill_s", "decode_step_s", "caption_s"]}
    tokens = None
    with torch.inference_mode():
        for _ in range(args.runs):
            calls.clear()
            t0 = time.perf_counter()
            image = Image.open(args.image).convert("RGB")
            inputs = processor(images=image, text=args.prompt, return_tensors="pt")
            t1 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.steps, min_new_tokens=args.steps)
            t2 = time.perf_counter()
            span = lambda name, i=0: calls[name][i][1] - calls[name][i][0]
            phases["preprocess_s"].append(t1 - t0)
            phases["vision_s"].append(span("vision"))
            phases["qformer_s"].append(span("qformer") + span("projection"))
            lm = calls["lm"]
            phases["prefill_s"].append(lm[0][1] - lm[0][0])
            phases["decode_step_s"].append(statistics.median(e - s for s, e in lm[1:]))
            phases["caption_s"].append(t2 - t0)
            tokens = out[0, -args.steps:].tolist()
        images = [Image.open(args.image).convert("RGB")] * args.batch
        batch_times = []
        for _ in range(max(1, args.runs - 1)):
            t = time.perf_counter()
            inputs = processor(images=images, text=[args.prompt] * args.batch, return_tensors="pt", padding=True)
            model.generate(**inputs, max_new_tokens=args.steps, min_new_tokens=args.steps)
            batch_times.append(time.perf_counter() - t)
        logits = first_logits(model, processor, args)
    result = {k: statistics.median(v) for k, v in phases.items()}
    result.update({
        "load_s": load,
        "batch_generate_s": statistics.median(batch_times),
        "batch": args.batch,
        "throughput_batch_rps": args.batch / statistics.median(batch_times),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens": tokens,
        "first_logits": logits,
        "int8": args.int8,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    })
    print(json.dumps(result))


def reference_batch(args):
    """One generate() at batch --batch after a warm-up caption, in a fresh process."""
    import torch
    from PIL import Image

    model, processor = load_reference(args)
    image = Image.open(args.image).convert("RGB")
    with torch.inference_mode():
        warm = processor(images=image, text=args.prompt, return_tensors="pt")
        model.generate(**warm, max_new_tokens=2, min_new_tokens=2)
        t = time.perf_counter()
        images = [Image.open(args.image).convert("RGB") for _ in range(args.batch)]
        inputs = processor(images=images, text=[args.prompt] * args.batch, return_tensors="pt", padding=True)
        model.generate(**inputs, max_new_tokens=args.steps, min_new_tokens=args.steps)
        elapsed = time.perf_counter() - t
    print(json.dumps({"batch_generate_s": elapsed, "throughput_batch_rps": args.batch / elapsed}))


def paired(args, int8=False, quantize="none"):
    """Back-to-back pairs: transformers (int8: dynamically quantised) generate(batch), then our
    server (quantize: its --quantize) under --batch clients."""
    pairs = []
    for i in range(args.pairs):
        ref = run_json([sys.executable, __file__, "--reference-batch-only"] + child_args(args)
                       + (["--int8"] if int8 else []))
        http = http_throughput(args, [args.batch], warmup=1, quantize=quantize)[args.batch]
        pair = {"transformers_batch_rps": ref["throughput_batch_rps"], "http_rps": http["rps"],
                "ratio": http["rps"] / ref["throughput_batch_rps"]}
        print(f"pair {i + 1}:", json.dumps(pair), flush=True)
        pairs.append(pair)
    return {"pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}


def logits_drift(f32, other):
    """Cosine, max |diff| and top-1 agreement of two logits vectors."""
    dot = sum(a * b for a, b in zip(f32, other))
    norm = lambda v: sum(x * x for x in v) ** 0.5
    top = lambda v: max(range(len(v)), key=v.__getitem__)
    return {"logits_cosine": dot / (norm(f32) * norm(other)),
            "logits_max_abs": max(abs(a - b) for a, b in zip(f32, other)),
            "top1_agrees": top(f32) == top(other)}


def child_args(args):
    """This invocation's arguments for a child run from ROOT, with the paths made absolute
    (argparse keeps the last of a repeated option)."""
    return sys.argv[1:] + ["--model", args.model, "--image", args.image]


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ours(args, quantize, logits_file):
    cmd = [args.bench, "--model", args.model, "--image", args.image, "--prompt", args.prompt,
           "--runs", str(args.runs), "--steps", str(args.steps), "--batch", str(args.batch),
           "--quantize", quantize]
    if quantize == "none":
        cmd += ["--save-logits", logits_file]
    else:
        cmd += ["--compare-logits", logits_file, "--no-hardware"]
    return run_json(cmd)


def http_throughput(args, concurrency_levels, warmup=None, quantize="none"):
    """Requests/s per concurrency level. Warm-up requests: `warmup` before every level when
    given, else one before the level of 1 client."""
    port = 38700
    server = subprocess.Popen(
        [args.binary, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
         "--max-batch-size", str(max(concurrency_levels)), "--image-cache-size", "0",
         "--quantize", quantize],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
                break
            except Exception:
                if server.poll() is not None:
                    sys.exit("the server exited")
                time.sleep(1)
        params = json.dumps({"max_new_tokens": args.steps, "min_new_tokens": args.steps})
        rows = {}
        for c in concurrency_levels:
            p = subprocess.run([sys.executable, os.path.join(HERE, "loadgen.py"), "--url", f"http://127.0.0.1:{port}",
                                "--image", args.image, "--prompt", args.prompt, "--parameters", params,
                                "--concurrency", str(c), "--requests", str(c), "--warmup", str(warmup if warmup is not None else int(c == 1))],
                               capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                sys.exit(p.stderr)
            cells = [x.strip() for x in p.stdout.strip().splitlines()[-1].strip("|").split("|")]
            rows[c] = {"rps": float(cells[2]), "p50_s": float(cells[3]), "p99_s": float(cells[5])}
        return rows
    finally:
        server.terminate()
        server.wait(timeout=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default=os.path.join(ROOT, "tests/fixtures/images/photo_320x240.jpg"))
    ap.add_argument("--prompt", default="a photo of")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quantize", nargs="*", default=["q8_0", "q4k"])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "blip2-server"))
    ap.add_argument("--bench", default=os.path.join(ROOT, "target", "release", "examples", "bench"))
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--pairs", type=lambda v: max(0, int(v)), default=3,
                    help="back-to-back throughput pairs, run first (0: none; needs the reference)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--peer-int8", action="store_true",
                    help="also transformers with torch dynamic int8 on every nn.Linear")
    ap.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-batch-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_only:
        return reference(args)
    if args.reference_batch_only:
        return reference_batch(args)
    args.image = os.path.abspath(args.image)
    args.model = os.path.abspath(args.model)
    results = {"model": args.model, "steps": args.steps, "batch": args.batch, "date": time.strftime("%Y-%m-%d")}
    quantized = args.quantize[0] if args.quantize else "none"
    if args.pairs and not args.skip_reference:
        results["paired"] = paired(args)
        print("paired:", json.dumps(results["paired"]), flush=True)
        if args.peer_int8:
            results["paired_int8"] = paired(args, int8=True, quantize=quantized)
            results["paired_int8"]["ours_quantize"] = quantized
            print("paired int8:", json.dumps(results["paired_int8"]), flush=True)
    if not args.skip_reference:
        results["transformers"] = run_json([sys.executable, __file__, "--reference-only"] + child_args(args))
        f32_logits = results["transformers"].pop("first_logits")
        print("transformers:", json.dumps(results["transformers"]), flush=True)
        if args.peer_int8:
            peer = run_json([sys.executable, __file__, "--reference-only", "--int8"] + child_args(args))
            peer.update(logits_drift(f32_logits, peer.pop("first_logits")))
            results["transformers_int8"] = peer
            print("transformers int8:", json.dumps(peer), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        logits = os.path.join(tmp, "logits.json")
        for q in ["none"] + args.quantize:
            results[f"ours_{q}"] = ours(args, q, logits)
            print(f"ours {q}:", json.dumps(results[f"ours_{q}"]), flush=True)
    levels = sorted({1, 2, 4, args.batch})
    results["http"] = http_throughput(args, levels)
    print("http:", json.dumps(results["http"]), flush=True)
    for q in args.quantize:
        results[f"http_{q}"] = http_throughput(args, [args.batch], warmup=1, quantize=q)
        print(f"http {q}:", json.dumps(results[f"http_{q}"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
