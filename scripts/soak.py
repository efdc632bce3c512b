#!/usr/bin/env python3
"""Load and soak run of `edgellm serve` over its Unix socket (a benchmark, not a test).

2,000 requests (default) over 16 connections, each keeping a few in flight, with random cancels
of its own requests, abrupt disconnects, duplicate ids, short deadlines and a few malformed
lines; then a last burst with SIGTERM in the middle of it. Checks, and prints as one JSON object:

- every request a connection still holds gets exactly one terminal reply (a duplicate id's
  refusal is told apart by its message), and nothing arrives for an id never sent;
- the status counters agree: received = accepted + queue_full + shutting_down + refused_other,
  and accepted = done + deadline_queued + failed once idle;
- the daemon's resident memory after the run is within 5 MiB of before it (after a warm-up);
- SIGTERM ends it with status 0, every request of the last burst answered.

  python3 scripts/soak.py [--binary target/release/edgellm] [--model M.gguf] [--requests 2000]
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def send(self, obj):
        line = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.s.sendall(line + b"\n")

    def recv(self):
        line = self.f.readline()
        if not line:
            return None
        return json.loads(line)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def status(path):
    c = Conn(path)
    c.send({"op": "status"})
    v = c.recv()
    c.close()
    return v


def request(rid, rng):
    kind = rng.random()
    body = {"id": rid, "max_tokens": rng.randint(1, 8), "temperature": 0,
            "seed": rng.randint(0, 1000)}
    if kind < 0.5:
        body["messages"] = [{"role": "user", "content": f"Say something about {rid}."}]
    else:
        body["prompt"] = f"Once upon a time ({rid})"
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.1:
        body["deadline_ms"] = rng.randint(1, 40)
    if rng.random() < 0.05:
        body["priority"] = rng.randint(-5, 5)
    return body


class Worker(threading.Thread):
    """One client: `n` requests over one connection (reconnecting after a disconnect)."""

    def __init__(self, path, k, n, seed, chaos=True):
        super().__init__(daemon=True)
        self.path, self.k, self.n, self.chaos = path, k, n, chaos
        self.rng = random.Random(seed)
        self.stats = {"sent": 0, "done": 0, "errors": {}, "duplicates_refused": 0,
                      "cancels": 0, "disconnects": 0, "abandoned": 0, "malformed": 0}
        self.problems = []

    def run(self):
        try:
            self.loop()
        except Exception as e:  # reported, not raised: the summary says what went wrong
            self.problems.append(f"worker {self.k}: {e!r}")

    def loop(self):
        rng, st = self.rng, self.stats
        c = Conn(self.path)
        inflight = {}  # id -> terminal replies seen
        sent = 0
        while sent < self.n or inflight:
            # Keep up to 4 in flight.
            while sent < self.n and len(inflight) < 4:
                rid = f"w{self.k}-{sent}"
                c.send(request(rid, rng))
                inflight[rid] = 0
                sent += 1
                st["sent"] += 1
                r = rng.random() if self.chaos else 1.0
                if r < 0.04:
                    # The same id again while the first is in flight: refused, the first kept.
                    c.send(request(rid, rng))
                    inflight[rid] -= 1  # one extra refusal expected
                elif r < 0.08:
                    c.send({"op": "cancel", "id": rid})
                    st["cancels"] += 1
                elif r < 0.09:
                    c.send(b'{"id": "bad", "messages": [{"role": "wizard"')
                    st["malformed"] += 1
            if self.chaos and rng.random() < 0.01 and inflight:
                # Gone without a word: the daemon cancels what it held.
                st["disconnects"] += 1
                st["abandoned"] += len(inflight)
                c.close()
                inflight.clear()
                c = Conn(self.path)
                continue
            v = c.recv()
            if v is None:
                self.problems.append(f"worker {self.k}: connection closed with {len(inflight)} in flight")
                return
            t = v.get("type")
            rid = v.get("id")
            if t in ("token", "cancel", "status"):
                continue
            if t == "error" and rid in (None, "bad"):
                continue  # the malformed line's answer
            if rid not in inflight:
                self.problems.append(f"worker {self.k}: reply for unknown id {rid}: {v}")
                continue
            # Each id expects one terminal reply, and one refusal per duplicate sent.
            if t == "error" and "already in flight" in v.get("message", ""):
                st["duplicates_refused"] += 1
            elif t == "done":
                st["done"] += 1
            else:
                code = v.get("code")
                st["errors"][code] = st["errors"].get(code, 0) + 1
            inflight[rid] += 1
            if inflight[rid] == 1:
                del inflight[rid]
            elif inflight[rid] > 1:
                self.problems.append(f"worker {self.k}: two terminal replies for {rid}")
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/edgellm"))
    ap.add_argument("--model", default=os.environ.get(
        "EDGELLM_MODEL", os.path.join(ROOT, "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    d = tempfile.mkdtemp(prefix="edgellm-soak-")
    sock = os.path.join(d, "s.sock")
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'[model]\npath = "{a.model}"\nn_ctx = 512\n[socket]\npath = "{sock}"\n'
                f'max_connections_per_uid = 64\n[queue]\ncapacity = 64\n[log]\nfilter = "warn"\n')
    log = open(os.path.join(d, "log"), "w")
    p = subprocess.Popen([a.binary, "serve", "--config", cfg], stderr=log, stdout=log)
    until = time.time() + 120
    while True:
        try:
            if status(sock)["type"] == "status":
                break
        except OSError:
            pass
        if time.time() > until or p.poll() is not None:
            sys.exit(f"daemon did not start: see {d}/log")
        time.sleep(0.1)

    # Warm-up, then the baseline.
    warm = [Worker(sock, 100 + k, 4, a.seed + 100 + k) for k in range(a.connections)]
    for w in warm:
        w.start()
    for w in warm:
        w.join()
    time.sleep(0.5)
    rss_before = rss_bytes(p.pid)

    t0 = time.time()
    per = a.requests // a.connections
    workers = [Worker(sock, k, per, a.seed + k) for k in range(a.connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.time() - t0
    # Idle: abandoned requests finish or are cancelled.
    until = time.time() + 60
    while True:
        s = status(sock)
        if s["queue"]["depth"] == 0 and s["queue"]["running"] is None:
            break
        if time.time() > until:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    rss_after = rss_bytes(p.pid)
    c = s["requests"]
    problems = [x for w in workers + warm for x in w.problems]
    if c["received"] != c["accepted"] + c["queue_full"] + c["shutting_down"] + c["refused_other"]:
        problems.append(f"counters: received does not add up: {c}")
    if c["accepted"] != c["done"] + c["deadline_queued"] + c["failed"]:
        problems.append(f"counters: accepted does not add up: {c}")
    if abs(rss_after - rss_before) > 5 << 20:
        problems.append(f"rss grew {(rss_after - rss_before) / 2**20:.1f} MiB")

    # The last burst, with SIGTERM in the middle of it.
    # No chaos in the burst: every reply is read. Four each: all sent before the stop.
    last = [Worker(sock, 1000 + k, 4, a.seed + 1000 + k, chaos=False) for k in range(4)]
    for w in last:
        w.start()
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    for w in last:
        w.join(60)
    code = p.wait(60)
    burst = {"sent": sum(w.stats["sent"] for w in last),
             "done": sum(w.stats["done"] for w in last),
             "errors": {}}
    for w in last:
        for k, v in w.stats["errors"].items():
            burst["errors"][k] = burst["errors"].get(k, 0) + v
        problems += w.problems
    if code != 0:
        problems.append(f"exit status {code} after SIGTERM")

    total = {"sent": 0, "done": 0, "errors": {}, "duplicates_refused": 0, "cancels": 0,
             "disconnects": 0, "abandoned": 0, "malformed": 0}
    for w in workers:
        for k, v in w.stats.items():
            if k == "errors":
                for e, n in v.items():
                    total["errors"][e] = total["errors"].get(e, 0) + n
            else:
                total[k] += v
    out = {
        "requests": total, "seconds": round(elapsed, 1),
        "requests_per_s": round(total["sent"] / elapsed, 1),
        "counters": c, "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "sigterm_burst": burst, "exit_status": code,
        "problems": problems, "ok": not problems,
    }
    print(json.dumps(out, indent=1))
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
