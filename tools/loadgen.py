#!/usr/bin/env python3
"""A bounded loopback load generator for blip2-server (standard library only).

For each concurrency level, `concurrency` threads each send requests back to back (keep-alive)
until `requests` have been sent in total; prints requests/s and p50/p95/p99 latency. Every
answer must be 200, so a run also checks the server under load.

  python3 tools/loadgen.py --url http://127.0.0.1:8080 --image IMG --concurrency 1 4 16 \
      --requests 64 --parameters '{"max_new_tokens": 20, "min_new_tokens": 20}'
"""
import argparse
import base64
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(url, path, body, concurrency, total):
    parsed = urllib.parse.urlparse(url)
    lock = threading.Lock()
    sent = [0]
    latencies, errors = [], []

    def worker():
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
        while True:
            with lock:
                if sent[0] >= total:
                    break
                sent[0] += 1
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - start
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append((response.status, data[:200]))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return wall, latencies, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--path", default="/v1/caption")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt")
    ap.add_argument("--parameters", default='{"max_new_tokens": 20, "min_new_tokens": 20}')
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    with open(args.image, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    payload = {"image": image, "parameters": json.loads(args.parameters)}
    if args.prompt:
        payload["prompt" if args.path.endswith("caption") else "question"] = args.prompt
    body = json.dumps(payload).encode()
    run_level(args.url, args.path, body, 1, args.warmup)
    print(f"| concurrency | requests | req/s | p50 s | p95 s | p99 s | mean s |")
    print(f"| --- | --- | --- | --- | --- | --- | --- |")
    for c in args.concurrency:
        wall, lat, errors = run_level(args.url, args.path, body, c, args.requests)
        if errors:
            raise SystemExit(f"concurrency {c}: {len(errors)} errors, first {errors[0]}")
        print(
            f"| {c} | {len(lat)} | {len(lat) / wall:.4f} | {percentile(lat, 50):.3f} | "
            f"{percentile(lat, 95):.3f} | {percentile(lat, 99):.3f} | {statistics.mean(lat):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
