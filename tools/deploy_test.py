#!/usr/bin/env python3
"""Deployment tests: the image, and replicas behind nginx (docker/compose.yaml) when replicas
die, restart, load or drain. Python's standard library and the docker CLI only.

  tools/deploy_test.py [--model DIR] [--port N] [--keep]

Needs the images `blip2-server` (docker build -f docker/Dockerfile -t blip2-server .) and the
base image of docker/lb (a registry's, or docker/base-images.sh's). Every load is bounded in
count and time and goes to loopback or the compose network. Prints one line per check and, for
failover and the rolling restart, the requests sent and failed; exits 1 on any failure.
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "blip2deploytest"
IMAGE = "blip2-server"
# Short drains keep the run short; the rules they follow are the defaults' (see README, Deploy).
DELAY_S, GRACE_S = 5, 15

failures = []


def log(msg):
    print(f"deploy-test: {msg}", flush=True)


def check(name, ok, detail=""):
    log(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def run(*args, env=None, check_rc=True, capture=True):
    r = subprocess.run(args, env=env, text=True, capture_output=capture)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout.strip() if capture else ""


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor docker-compose is installed")


class Compose:
    def __init__(self, model_dir, port, extra_env=None):
        self.cmd = compose_cmd() + ["-p", PROJECT, "-f", str(ROOT / "docker" / "compose.yaml")]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_")}
        self.env.update(
            BLIP2_MODEL_DIR=str(model_dir),
            BLIP2_PORT=str(port),
            BLIP2_SHUTDOWN_DELAY_S=str(DELAY_S),
            BLIP2_SHUTDOWN_GRACE_S=str(GRACE_S),
        )
        self.env.update(extra_env or {})

    def __call__(self, *args, env=None):
        e = dict(self.env)
        e.update(env or {})
        return run(*self.cmd, *args, env=e)

    def replicas(self):
        ids = self("ps", "-q", "blip2").split()
        return [Replica(i) for i in ids]


class Replica:
    def __init__(self, cid):
        self.id = cid

    def inspect(self, fmt):
        return run("docker", "inspect", "-f", fmt, self.id)

    @property
    def ip(self):
        return self.inspect("{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]

    def health(self):
        return self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}}")

    def running(self):
        return self.inspect("{{.State.Running}}") == "true"

    def get(self, path, timeout=2):
        return http_get(self.ip, 8080, path, timeout)

    def caption_200s(self):
        status, body = self.get("/metrics")
        if status != 200:
            return None
        for line in body.splitlines():
            if line.startswith('blip2_requests_total{endpoint="/v1/caption",status="200"}'):
                return int(float(line.split()[-1]))
        return 0


def http_get(host, port, path, timeout=5):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    except OSError as e:
        return 0, str(e)
    finally:
        c.close()


IMAGE_B64 = base64.b64encode((ROOT / "tests/fixtures/images/photo_320x240.jpg").read_bytes()).decode()


def caption(port, tokens=8, stream=False, timeout=60):
    """One caption through the balancer: (status, upstream, body or events, first/last times)."""
    body = json.dumps(
        {
            "image": IMAGE_B64,
            "stream": stream,
            "parameters": {"max_new_tokens": tokens, "min_new_tokens": tokens},
        }
    )
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        c.request("POST", "/v1/caption", body, {"content-type": "application/json"})
        r = c.getresponse()
        upstream = r.getheader("x-upstream-addr", "")
        if not stream or r.status != 200:
            data = r.read()
            return r.status, upstream, data, None
        times, events, buf = [], [], b""
        reads = 0
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            reads += 1
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = [l[5:].strip() for l in event.split(b"\n") if l.startswith(b"data:")]
                if data:
                    times.append(time.monotonic() - started)
                    events.append(json.loads(data[0]))
        caption.reads = reads
        return r.status, upstream, events, times
    except (OSError, http.client.HTTPException, ValueError) as e:
        return 0, "", str(e).encode(), None
    finally:
        c.close()


def complete_stream(events):
    """A stream that ended with its result event (not cut mid-way, not an error)."""
    return bool(events) and "finish_reason" in events[-1] and "token" not in events[-1]


class Load:
    """`clients` threads sending captions until stopped (at most `max_s` seconds); half of
    each client's requests stream when `streams` is set."""

    def __init__(self, port, clients, max_s, streams=False):
        self.port, self.max_s, self.streams = port, max_s, streams
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.failed = []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]

    def client(self, i):
        deadline = time.monotonic() + self.max_s
        n = 0
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            stream = self.streams and n % 2 == 1
            status, upstream, out, _ = caption(self.port, tokens=8, stream=stream)
            ok = status == 200 and (complete_stream(out) if stream else b"finish_reason" in out)
            with self.lock:
                self.sent += 1
                if not ok:
                    self.failed.append((status, upstream, stream, out[-200:] if isinstance(out, bytes) else out[-1:]))
            n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def wait_for(what, predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def in_rotation(port, n, tries=120):
    """The balancer spreads over `n` replicas (least_conn: concurrent requests reach them all)."""
    seen = set()
    for _ in range(tries):
        results = []
        threads = [threading.Thread(target=lambda: results.append(caption(port, tokens=4))) for _ in range(n * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen |= {u for s, u, _, _ in results if s == 200}
        if len(seen) >= n:
            return seen
        time.sleep(0.2)
    return seen


def test_image(model_dir):
    inspect = json.loads(run("docker", "image", "inspect", IMAGE))[0]
    size_mb = inspect["Size"] / 1e6
    cfg = inspect["Config"]
    check("image runs as a numeric non-root user", cfg.get("User") == "10001:10001", cfg.get("User"))
    check("image has a HEALTHCHECK", bool(cfg.get("Healthcheck", {}).get("Test")), str(cfg.get("Healthcheck", {}).get("Test")))
    log(f"image size: {size_mb:.0f} MB")
    name = f"{PROJECT}-single"
    run("docker", "rm", "-f", name, check_rc=False)
    started = time.monotonic()
    run(
        "docker", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--health-interval", "500ms", "--health-start-period", "60s",
        "-v", f"{model_dir}:/model:ro", "-e", "BLIP2_MODEL=/model",
        "-e", f"BLIP2_SHUTDOWN_DELAY_S={DELAY_S}", "-e", f"BLIP2_SHUTDOWN_GRACE_S={GRACE_S}",
        IMAGE, "serve",
    )
    r = Replica(name)
    wait_for("the container to be healthy", lambda: r.health() == "healthy", 120)
    healthy_s = time.monotonic() - started
    log(f"docker run to healthy (tiny fixture): {healthy_s:.1f} s")
    uid = run("docker", "exec", name, "blip2-server", "--version")
    top = run("docker", "top", name, "-o", "uid,pid,args")
    check("the server is PID 1 of its container, as uid 10001", "10001" in top and "blip2-server" in top, top.replace("\n", " | "))
    check("the image's binary answers --version", uid.startswith("blip2-server"), uid)
    started = time.monotonic()
    run("docker", "stop", "-t", str(DELAY_S + GRACE_S + 10), name)
    stop_s = time.monotonic() - started
    code = r.inspect("{{.State.ExitCode}}")
    check(
        f"SIGTERM: exit 0 within shutdown_delay_s + grace ({DELAY_S}+{GRACE_S} s)",
        code == "0" and DELAY_S - 0.5 <= stop_s <= DELAY_S + GRACE_S,
        f"exit {code} after {stop_s:.1f} s",
    )
    run("docker", "rm", "-f", name, check_rc=False)
    return size_mb, healthy_s


def test_compose(model_dir, port):
    compose = Compose(model_dir, port)
    compose("down", "-v", "--remove-orphans")
    compose("build", "lb")
    compose("up", "-d", "--scale", "blip2=3")
    replicas = compose.replicas()
    check("compose started 3 replicas", len(replicas) == 3, str(len(replicas)))
    wait_for("3 healthy replicas", lambda: all(r.health() == "healthy" for r in replicas), 180)
    ips = {r.ip for r in replicas}
    seen = in_rotation(port, 3)
    check("the balancer admits every ready replica", {s.split(":")[0] for s in seen} == ips, f"{seen} vs {ips}")

    # Spread: 60 requests, 4 at a time, reach all 3 (response header and each replica's metrics).
    before = {r.id: r.caption_200s() for r in replicas}
    results = []
    lock = threading.Lock()

    def send(n):
        for _ in range(n):
            out = caption(port)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=send, args=(15,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_upstream = {}
    for s, u, _, _ in results:
        by_upstream[u] = by_upstream.get(u, 0) + 1
    counted = {r.ip: r.caption_200s() - before[r.id] for r in replicas}
    check(
        "spread: 60 requests answered 200 by all 3 replicas",
        all(s == 200 for s, *_ in results) and len(by_upstream) == 3 and sum(counted.values()) >= 60 and all(v > 0 for v in counted.values()),
        f"by header {sorted(by_upstream.values())}, by replica metrics {sorted(counted.values())}",
    )

    # SSE through nginx: token events arrive as generated, not held to the end.
    status, _, events, times = caption(port, tokens=100, stream=True)
    tokens = [t for t, e in zip(times or [], events or []) if "token" in e]
    ok = status == 200 and complete_stream(events) and len(tokens) == 100
    spread = (times[-1] - tokens[0]) if ok else 0
    # Held to the end, all 101 events would come in one or a few reads at the same moment.
    check(
        "SSE through nginx: events arrive as generated (the first token well before the last)",
        ok and tokens[0] < 0.5 * times[-1] and caption.reads >= 10,
        f"{len(tokens)} tokens in {caption.reads} reads, first at {tokens[0] * 1e3:.1f} ms, "
        f"last event at {times[-1] * 1e3:.1f} ms" if ok else f"status {status}",
    )

    # Failover: one replica killed while 4 clients send for 30 s.
    with Load(port, clients=4, max_s=30) as load:
        time.sleep(5)
        victim = replicas[0]
        run("docker", "kill", victim.id)
        time.sleep(25)
    log(f"failover: {load.sent} requests sent, {len(load.failed)} failed")
    check("failover: every request answered 200 while a replica was killed", load.sent > 0 and not load.failed, str(load.failed[:3]))
    # restart: unless-stopped brings it back; wait so the next check starts with 3.
    run("docker", "start", victim.id, check_rc=False)
    wait_for("the killed replica to be healthy again", lambda: victim.health() == "healthy", 120)
    in_rotation(port, 3)

    # Rolling restart: each replica stopped with SIGTERM and started again under load (plain
    # and streamed requests); nothing fails and no stream is cut.
    with Load(port, clients=4, max_s=300, streams=True) as load:
        for r in replicas:
            started = time.monotonic()
            run("docker", "stop", "-t", str(DELAY_S + GRACE_S + 10), r.id)
            stopped_s = time.monotonic() - started
            code = r.inspect("{{.State.ExitCode}}")
            check(f"rolling restart: replica stopped cleanly (exit {code}, {stopped_s:.1f} s)", code == "0")
            run("docker", "start", r.id)
            wait_for("the restarted replica to be healthy", lambda: r.health() == "healthy", 120)
            time.sleep(2)
    log(f"rolling restart: {load.sent} requests sent, {len(load.failed)} failed")
    check("rolling restart: every request answered 200, no stream cut", load.sent > 0 and not load.failed, str(load.failed[:3]))

    # A replica still loading: not healthy, and no request reaches it.
    seen_before = {r.id for r in compose.replicas()}
    compose("up", "-d", "--no-recreate", "--scale", "blip2=4", env={"BLIP2_DEBUG_LOAD_DELAY_MS": "20000"})
    new = [r for r in compose.replicas() if r.id not in seen_before]
    check("a 4th replica started", len(new) == 1)
    loading = new[0]
    wait_for("the loading replica to listen", lambda: loading.get("/health")[0] == 200, 60)
    with Load(port, clients=4, max_s=10) as load:
        time.sleep(10)
    ready_status, _ = loading.get("/ready")
    _, info = loading.get("/info")
    health = loading.health()
    hits = loading.caption_200s()
    results = [caption(port) for _ in range(20)]
    reached = [u for _, u, _, _ in results if u.startswith(loading.ip + ":")]
    check(
        "a loading replica gets no request and is not healthy",
        not load.failed and ready_status == 503 and health == "starting" and not reached and hits in (0, None),
        f"sent {load.sent}, failed {len(load.failed)}, /ready {ready_status}, docker health {health!r}, "
        f"phase {json.loads(info).get('startup', {}).get('phase') if info.startswith('{') else info!r}",
    )
    wait_for("the 4th replica to be healthy", lambda: loading.health() == "healthy", 120)
    seen = in_rotation(port, 4)
    check("once loaded it joins the rotation", any(u.startswith(loading.ip + ":") for u in seen), str(seen))
    return compose


def test_swarm(model_dir, port):
    """The compose file as a swarm stack; a rolling update with --update-order start-first
    under load. Swarm may not run on a machine: then say why and go on."""
    state = run("docker", "info", "-f", "{{.Swarm.LocalNodeState}}")
    joined_here = False
    if state != "active":
        r = subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"SKIP swarm: `docker swarm init` failed: {r.stderr.strip()}")
            return
        joined_here = True
    stack = f"{PROJECT}stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_")}
    env.update(
        BLIP2_MODEL_DIR=str(model_dir), BLIP2_PORT=str(port), BLIP2_LB_BACKEND="tasks.blip2",
        BLIP2_SHUTDOWN_DELAY_S=str(DELAY_S), BLIP2_SHUTDOWN_GRACE_S=str(GRACE_S),
    )
    service = f"{stack}_blip2"
    try:
        run("docker", "stack", "deploy", "-c", str(ROOT / "docker" / "compose.yaml"), stack, env=env)

        def healthy_tasks():
            ids = run("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").split()
            return [Replica(i) for i in ids if Replica(i).health() == "healthy"]

        wait_for("3 healthy swarm tasks", lambda: len(healthy_tasks()) == 3, 180)
        seen = in_rotation(port, 3)
        check("swarm: the balancer admits the 3 tasks", len(seen) == 3, str(seen))
        with Load(port, clients=4, max_s=300, streams=True) as load:
            time.sleep(2)
            started = time.monotonic()
            run("docker", "service", "update", "--force", "--update-order", "start-first",
                "--detach=false", service)
            took = time.monotonic() - started
            time.sleep(2)
        log(f"swarm rolling update (start-first, {took:.0f} s): {load.sent} requests sent, {len(load.failed)} failed")
        check("swarm rolling update: every request answered 200, no stream cut", load.sent > 0 and not load.failed, str(load.failed[:3]))
    finally:
        run("docker", "stack", "rm", stack, check_rc=False)
        # Tasks and the stack's network go away asynchronously.
        try:
            wait_for("the stack to be removed", lambda: not run("docker", "ps", "-q", "--filter", f"label=com.docker.stack.namespace={stack}"), 90)
            wait_for("the stack's network to be removed", lambda: not run("docker", "network", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}"), 60)
        except RuntimeError as e:
            log(str(e))
        if joined_here:
            run("docker", "swarm", "leave", "--force", check_rc=False)



def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "tests/fixtures/models/opt-tiny"))
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--keep", action="store_true", help="leave the compose project running")
    args = p.parse_args()
    model_dir = Path(args.model).resolve()
    started = time.monotonic()
    compose = None
    try:
        test_image(model_dir)
        compose = test_compose(model_dir, args.port)
        compose("down", "-v", "--remove-orphans")
        compose = None
        test_swarm(model_dir, args.port + 1)
    except RuntimeError as e:
        check("deployment test ran to the end", False, str(e))
    finally:
        if not args.keep:
            Compose(model_dir, args.port)("down", "-v", "--remove-orphans")
    log(f"{'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'} ({time.monotonic() - started:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
