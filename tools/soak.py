#!/usr/bin/env python3
"""Soak: the tiny checkpoint at about twice its measured capacity, bounded in time, loopback
only, with the traffic a server meets: caption, VQA, chat and features, streamed and not, valid
and invalid, clients that hang up mid-stream, clients that read slowly, requests that time out.

    python3 tools/soak.py BINARY [--seconds 60] [--model tests/fixtures/models/opt-tiny]
        [--out soak.json]

It starts `BINARY serve` itself (request_timeout_s 2, so that overload ends in 504s), measures
capacity (captions per second with 4 closed-loop clients, 5 s), then sends requests at twice
that rate, open loop, for --seconds. Checks (exit 1 when one fails):
  - every request got an answer, 2xx, 4xx, 429, 503 (busy) or 504, never another 5xx, never
    a hang past its client timeout (30 s);
  - blip2_requests_total, summed over the /v1 routes, grew by what the clients sent;
  - RSS, sampled every 10 s under load, flat after warm-up (the first half of the run): none
    above the first sample after warm-up by more than 5% (runs of 300 s and more; shorter ones
    check that its growth slows down in the second half, as a high-water mark does and a leak
    does not); open file descriptors (also sampled,
    and reported) back to what they were once the server is idle again (within 5% or 4);
  - /health answered within 100 ms throughout (probed every 0.5 s).
Prints the figures: requests sent / answered / by status (and arrivals the client itself was too
busy to send), RSS and fds first and last.
Stdlib only (CI runs it without installing anything).
"""
import argparse
import base64
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_TIMEOUT = 30.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_b64(name):
    with open(os.path.join(ROOT, "tests", "fixtures", "images", name), "rb") as f:
        return base64.b64encode(f.read()).decode()


IMAGES = [image_b64(n) for n in ["photo_320x240.jpg", "rgb_640x480.png", "rgba_100x37.png", "gray_13x200.png"]]


def request_kinds():
    """(weight, name, path, body, mode): mode is how the client reads the answer. Bodies are
    serialised once per image (the client shares the machine's cores with the server)."""
    img = lambda: random.choice(IMAGES)
    few = {"max_new_tokens": 6}
    return [
        (5, "caption", "/v1/caption", lambda: {"image": img(), "parameters": few}, "read"),
        (3, "vqa", "/v1/vqa", lambda: {"image": img(), "question": "what is it?", "parameters": few}, "read"),
        (2, "chat", "/v1/chat/completions", lambda: {
            "model": "m", "max_tokens": 6,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is in the picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + img()}}]}]}, "read"),
        (2, "features", "/v1/features", lambda: {"image": img(), "stage": "projected", "encoding_format": "base64"}, "read"),
        (2, "stream", "/v1/caption", lambda: {"image": img(), "stream": True, "parameters": {"max_new_tokens": 12}}, "read"),
        (1, "hang-up", "/v1/caption", lambda: {"image": img(), "stream": True, "parameters": {"max_new_tokens": 40, "min_new_tokens": 40}}, "hangup"),
        (1, "slow-reader", "/v1/caption", lambda: {"image": img(), "stream": True, "parameters": {"max_new_tokens": 8}}, "slow"),
        (1, "long", "/v1/caption", lambda: {"image": img(), "parameters": {"max_new_tokens": 80, "min_new_tokens": 80, "num_beams": 6}}, "read"),
        (1, "bad-json", "/v1/caption", lambda: "{not json", "read"),
        (1, "bad-image", "/v1/vqa", lambda: {"image": base64.b64encode(b"not an image").decode(), "question": "x"}, "read"),
        (1, "bad-param", "/v1/caption", lambda: {"image": img(), "parameters": {"top_p": 7}}, "read"),
    ]


def serialised(kinds):
    """Each kind with a few bodies made up front (one per image, as the body functions pick)."""
    out = []
    for weight, name, path, body, mode in kinds:
        bodies = [b if isinstance(b, str) else json.dumps(b) for b in (body() for _ in range(8))]
        out.append((weight, name, path, (lambda bodies=bodies: random.choice(bodies)), mode))
    return out


def send(port, path, body, mode):
    """One request; returns (status or None when no answer came, seconds)."""
    started = time.monotonic()
    data = body if isinstance(body, str) else json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", path, data, {"content-type": "application/json"})
        r = conn.getresponse()
        if mode == "hangup" and r.status == 200:
            r.read1(256)  # the first event, then gone
            conn.sock.shutdown(socket.SHUT_RDWR)
        elif mode == "slow" and r.status == 200:
            while r.read1(64):
                time.sleep(0.2)
        else:
            r.read()
        return r.status, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return None, time.monotonic() - started
    finally:
        conn.close()


def get(port, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def v1_requests_total(port):
    _, text = get(port, "/metrics")
    total = 0.0
    for line in text.splitlines():
        m = re.match(r'blip2_requests_total\{([^}]*)\}\s+([0-9.e+]+)', line)
        if m and re.search(r'endpoint="/v1/', m.group(1)):
            total += float(m.group(2))
    return int(total)


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "models", "opt-tiny"))
    ap.add_argument("--out")
    args = ap.parse_args()
    random.seed(0)
    port = free_port()
    env = dict(os.environ, BLIP2_MODEL=args.model, BLIP2_PORT=str(port), BLIP2_HOST="127.0.0.1",
               BLIP2_REQUEST_TIMEOUT_S="2", BLIP2_SHUTDOWN_DELAY_S="0", BLIP2_LOG_FORMAT="json", RUST_LOG="error")
    server = subprocess.Popen([args.binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(port, "/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("soak: the server did not become ready")
                return 1
            time.sleep(0.1)

        # Capacity: captions per second with 4 closed-loop clients.
        stop_at = time.monotonic() + 5
        done = []

        def closed_loop():
            while time.monotonic() < stop_at:
                status, _ = send(port, "/v1/caption", {"image": IMAGES[0], "parameters": {"max_new_tokens": 6}}, "read")
                done.append(status)
        threads = [threading.Thread(target=closed_loop) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        capacity = sum(1 for s in done if s == 200) / 5.0
        rate = 2 * capacity
        print(f"soak: capacity {capacity:.1f} captions/s; sending {rate:.1f} requests/s for {args.seconds:.0f} s", flush=True)

        kinds = serialised(request_kinds())
        weights = [k[0] for k in kinds]
        base_total = v1_requests_total(port)
        before = proc_sample(server.pid)
        results, lock = [], threading.Lock()
        samples, health = [], []
        run_end = time.monotonic() + args.seconds
        stop = threading.Event()

        def sampler():
            next_sample = time.monotonic()
            while not stop.is_set():
                if time.monotonic() >= next_sample:
                    samples.append((time.monotonic(), *proc_sample(server.pid)))
                    next_sample += 10
                t = time.monotonic()
                try:
                    status, _ = get(port, "/health", timeout=2)
                except OSError:
                    status = None
                health.append((status, time.monotonic() - t))
                stop.wait(0.5)
        watcher = threading.Thread(target=sampler)
        watcher.start()

        def one(kind):
            _, name, path, body, mode = kind
            status, seconds = send(port, path, body(), mode)
            with lock:
                results.append((name, status, seconds))

        # The client's own limit: at most WORKERS requests open and as many waiting for a
        # thread. An arrival beyond that is not sent (and counted as skipped), so that a client
        # slower than the rate cannot pile up work that runs on past the run's end.
        workers = 768
        pending = threading.BoundedSemaphore(2 * workers)
        skipped = 0

        def one_then_release(kind):
            try:
                one(kind)
            finally:
                pending.release()

        with ThreadPoolExecutor(max_workers=workers) as pool:
            next_at = time.monotonic()
            sent = 0
            while time.monotonic() < run_end:
                if pending.acquire(blocking=False):
                    pool.submit(one_then_release, random.choices(kinds, weights)[0])
                    sent += 1
                else:
                    skipped += 1
                next_at += random.expovariate(rate)
                time.sleep(max(0.0, next_at - time.monotonic()))
        stop.set()
        watcher.join()
        after = proc_sample(server.pid)
        time.sleep(0.5)  # the last answers' metrics
        counted = v1_requests_total(port) - base_total

        by_status = {}
        for _, status, _ in results:
            by_status[str(status)] = by_status.get(str(status), 0) + 1
        by_kind = {}
        for name, status, _ in results:
            by_kind.setdefault(name, {}).setdefault(str(status), 0)
            by_kind[name][str(status)] += 1
        unanswered = by_status.get("None", 0)
        bad_5xx = sum(n for s, n in by_status.items() if s not in ("None",) and int(s) >= 500 and int(s) not in (503, 504))
        slowest = max((s for _, _, s in results), default=0)
        # Warm-up is the first half: RSS is the heap's high-water mark (freed memory is kept
        # for reuse, src/tuning.rs), which rises in steps while rarer peaks of concurrent work
        # occur; a leak keeps rising. Compared: the first sample after warm-up with the highest
        # one after it, all taken under load.
        warm = [s for s in samples if s[0] >= samples[0][0] + args.seconds / 2] or samples[-1:]
        rss_first, rss_last = warm[0][1], max(s[1] for s in warm)
        # Under load the descriptor count is the connections in flight (it swings with them);
        # a leak shows when the server is idle again: compared before and after the run.
        fd_first, fd_last = before[1], after[1]
        health_worst = max((t for _, t in health), default=0)
        health_bad = sum(1 for s, t in health if s != 200 or t > 0.1)
        report = {
            "seconds": args.seconds, "capacity_rps": capacity, "rate_rps": rate,
            "sent": sent, "skipped_client_saturated": skipped,
            "answered": len(results) - unanswered, "unanswered": unanswered,
            "by_status": by_status, "by_kind": by_kind, "counted_by_server": counted,
            "slowest_s": slowest, "rss_samples": [s[1] for s in samples], "fd_samples": [s[2] for s in samples],
            "rss_after_warmup_first": rss_first, "rss_after_warmup_max": rss_last,
            "rss_before_run": before[0], "rss_after_run": after[0],
            "fd_before_run": fd_first, "fd_after_run": fd_last,
            "health_probes": len(health), "health_worst_s": health_worst, "health_over_100ms_or_failed": health_bad,
        }
        print(json.dumps(report, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

        def check(name, ok, detail):
            print(f"soak: {'PASS' if ok else 'FAIL'} {name}: {detail}")
            if not ok:
                failures.append(name)
        check("every request answered", unanswered == 0 and len(results) == sent, f"{len(results) - unanswered} of {sent}")
        check("no 5xx but 503/504", bad_5xx == 0, json.dumps(by_status))
        check("blip2_requests_total counts every request", counted == sent, f"server {counted}, clients {sent}")
        if args.seconds >= 300:
            check("RSS flat after warm-up", rss_last <= rss_first * 1.05,
                  f"{rss_first >> 20} -> at most {rss_last >> 20} MiB")
        else:
            # Too short for the high-water mark to settle (it took about 210 s in a 10-minute run
            # here): a leak grows as fast in the second half as in the first, a high-water mark
            # slows down. The 10-minute run checks the 5% bound.
            first_half = rss_first - samples[0][1]
            second_half = rss_last - rss_first
            check("RSS growth slowing (a leak would not)",
                  second_half <= 0.05 * rss_first or second_half < 0.5 * first_half,
                  f"{samples[0][1] >> 20} -> {rss_first >> 20} MiB in the first half, "
                  f"-> at most {rss_last >> 20} MiB in the second")
        check("no file descriptor left behind", fd_last <= max(fd_first * 1.05, fd_first + 4), f"idle before {fd_first}, idle after {fd_last}")
        check("/health within 100 ms", health_bad == 0, f"{len(health)} probes, worst {health_worst * 1e3:.1f} ms")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
