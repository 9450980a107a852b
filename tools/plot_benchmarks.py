#!/usr/bin/env python3
"""Plots requests/s versus concurrency from bench_vs_transformers.py's results JSON.

    python tools/plot_benchmarks.py bench-results.json docs/throughput.png

Needs matplotlib (pip install matplotlib==3.10.8).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    results = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    http = {int(k): v for k, v in results["http"].items()}
    levels = sorted(http)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(levels, [http[c]["rps"] for c in levels], "o-", label="blip2-server f32, HTTP, N concurrent clients")
    ref = results.get("transformers")
    if ref:
        single = 1.0 / ref["caption_s"]
        batch = ref["throughput_batch_rps"]
        ax.plot([1, ref["batch"]], [single, batch], "s--",
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
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
