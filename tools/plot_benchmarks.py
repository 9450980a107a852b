#!/usr/bin/env python3
"""Renders bench_vs_transformers.py's results JSON: a PNG of requests/s versus concurrency and
the markdown tables that BENCHMARKS.md quotes.

    python tools/plot_benchmarks.py bench-results.json docs/throughput.png > tables.md

Needs matplotlib (pip install matplotlib==3.10.8).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GIB = 1024 ** 3


def plot(results, out):
    http = {int(k): v for k, v in results["http"].items()}
    levels = sorted(http)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(levels, [http[c]["rps"] for c in levels], "o-", label="blip2-server f32, HTTP, N concurrent clients")
    ref = results.get("transformers")
    if ref:
        ax.plot([1, ref["batch"]], [1.0 / ref["caption_s"], ref["throughput_batch_rps"]], "s--",
                label=f"transformers {ref['transformers']} f32, offline generate() (batch 1, {ref['batch']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent requests (transformers: batch size)")
    ax.set_ylabel(f"captions per second ({results['steps']} tokens each)")
    ax.set_title(f"{results['model'].rstrip('/').split('/')[-1]}, random weights, 2-core CPU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def tables(results):
    ref = results.get("transformers", {})
    ours = results["ours_none"]
    rows = [
        ("load (s)", "load_s"),
        ("preprocess (s)", "preprocess_s"),
        ("vision encoder (s)", "vision_s"),
        ("Q-Former + projection (s)", "qformer_s"),
        ("prefill (s)", "prefill_s"),
        ("decode step, batch 1 (s)", "decode_step_s"),
        (f"one caption, {results['steps']} tokens, end to end (s)", "caption_s"),
    ]
    print("| phase (median) | transformers f32 | blip2-server f32 | ours / theirs |")
    print("| --- | --- | --- | --- |")
    for name, key in rows:
        a, b = ref.get(key), ours.get(key)
        ratio = f"{b / a:.2f}" if a and b else ""
        print(f"| {name} | {a:.3f} | {b:.3f} | {ratio} |" if a is not None else f"| {name} | | {b:.3f} | |")
    print(f"| peak RSS (GiB) | {ref.get('peak_rss', 0) / GIB:.2f} | {ours['peak_rss'] / GIB:.2f} | "
          f"{ours['peak_rss'] / ref['peak_rss']:.2f} |" if ref else "")
    print()
    print("| hardware | value |")
    print("| --- | --- |")
    print(f"| read bandwidth (GB/s) | {ours['bandwidth_gb_s']:.1f} |")
    print(f"| f32 matmul 512x2560x2560 (GFLOP/s) | {ours['matmul_gflops']:.0f} |")
    print(f"| language-model bytes read per decode step (GB) | {ours['lm_step_bytes'] / 1e9:.2f} |")
    print(f"| decode floor = bytes / bandwidth (s) | {ours['decode_floor_s']:.3f} |")
    print(f"| f32 decode step / floor | {ours['decode_step_s'] / ours['decode_floor_s']:.2f} |")
    print()
    print("| weights | load (s) | peak RSS (GiB) | RSS vs f32 | decode step b1 (s) | speed-up vs f32 | "
          "decode step b8 (s) | vision (s) | prefill (s) | caption (s) | logits cosine (min) | max abs | top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for q in ["none", "q8_0", "q4k"]:
        r = results.get(f"ours_{q}")
        if not r:
            continue
        cos = f"{r['logits_cosine_min']:.5f}" if "logits_cosine_min" in r else "(reference)"
        mx = f"{r['logits_max_abs']:.3g}" if "logits_max_abs" in r else ""
        print(f"| {'f32' if q == 'none' else q} | {r['load_s']:.1f} | {r['peak_rss'] / GIB:.2f} | "
              f"{r['peak_rss'] / ours['peak_rss']:.2f} | {r['decode_step_s']:.3f} | "
              f"{ours['decode_step_s'] / r['decode_step_s']:.2f}x | {r['decode_step_batch_s']:.3f} | "
              f"{r['vision_s']:.2f} | {r['prefill_s']:.2f} | {r['caption_s']:.2f} | {cos} | {mx} | "
              f"{r.get('top1_agreement', '')} |")
    print()
    http = {int(k): v for k, v in results["http"].items()}
    print("| clients | blip2-server HTTP req/s | p50 (s) | p99 (s) |")
    print("| --- | --- | --- | --- |")
    for c in sorted(http):
        print(f"| {c} | {http[c]['rps']:.4f} | {http[c]['p50_s']:.2f} | {http[c]['p99_s']:.2f} |")
    if ref:
        b = ref["batch"]
        print()
        print(f"transformers generate(), batch {b}: {ref['batch_generate_s']:.1f} s = "
              f"{ref['throughput_batch_rps']:.4f} req/s; blip2-server, {b} concurrent HTTP clients: "
              f"{http[b]['rps']:.4f} req/s = {http[b]['rps'] / ref['throughput_batch_rps']:.2f}x.")
    paired = results.get("paired")
    if paired:
        b = results["batch"]
        print()
        print(f"| pair (back to back, fresh processes) | transformers generate(batch {b}) req/s | "
              f"blip2-server {b} HTTP clients req/s | ratio |")
        print("| --- | --- | --- | --- |")
        for i, p in enumerate(paired["pairs"], 1):
            print(f"| {i} | {p['transformers_batch_rps']:.4f} | {p['http_rps']:.4f} | {p['ratio']:.2f}x |")
        print(f"| median | | | {paired['median_ratio']:.2f}x |")


def main():
    results = json.load(open(sys.argv[1]))
    plot(results, sys.argv[2])
    tables(results)


if __name__ == "__main__":
    main()
