#!/usr/bin/env python3
"""Load on the HTTP API of a running `edgellm serve --http`: CLIENTS concurrent clients for
SECONDS, each looping over OpenAI and Ollama requests, streamed and not, a share of them hanging
up mid-stream, waiting as `Retry-After` says when the queue is full. Reports what came back by status, time to first byte, tokens/s, the daemon's own
counters (from /metrics), and its resident memory before and after (from /metrics).

  ~/.cache/edgellm/venv/bin/python scripts/http-load.py http://127.0.0.1:11434 MODEL \
      [--clients 16] [--seconds 60] [--max-tokens 32] [--hangup 0.1]

Exits 1 when a request got no HTTP answer, a 5xx other than 503, or the daemon's counters do
not add up (every request it received ended exactly once).
"""
import argparse
import random
import statistics
import threading
import time

import httpx

p = argparse.ArgumentParser()
p.add_argument("base")
p.add_argument("model")
p.add_argument("--clients", type=int, default=16)
p.add_argument("--seconds", type=float, default=60)
p.add_argument("--max-tokens", type=int, default=32)
p.add_argument("--hangup", type=float, default=0.1, help="share of streams dropped mid-way")
p.add_argument("--key", default="")
a = p.parse_args()
headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}


def metrics():
    text = httpx.get(a.base + "/metrics", headers=headers, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


lock = threading.Lock()
statuses, ttfb, problems = {}, [], []
hangups = 0
stop_at = time.time() + a.seconds
questions = ["What is the capital of France?", "Name three colours.", "Say hello.",
             "What is 2 + 2?", "Write one sentence about the sea."]


def one(client, rng):
    global hangups
    q = [{"role": "user", "content": rng.choice(questions)}]
    kind = rng.randrange(4)
    stream = rng.random() < 0.5
    if kind == 0:
        path, body = "/v1/chat/completions", {"model": a.model, "messages": q,
                                              "max_tokens": a.max_tokens, "stream": stream}
    elif kind == 1:
        path, body = "/v1/completions", {"model": a.model, "prompt": q[0]["content"],
                                         "max_tokens": a.max_tokens, "stream": stream}
    elif kind == 2:
        path, body = "/api/chat", {"model": a.model, "messages": q, "stream": stream,
                                   "options": {"num_predict": a.max_tokens}}
    else:
        path, body = "/api/generate", {"model": a.model, "prompt": q[0]["content"],
                                       "stream": stream, "options": {"num_predict": a.max_tokens}}
    t0 = time.time()
    drop = stream and rng.random() < a.hangup
    try:
        with client.stream("POST", a.base + path, json=body, headers=headers) as r:
            first = None
            for i, _ in enumerate(r.iter_bytes()):
                if first is None:
                    first = time.time() - t0
                if drop and i >= 2:
                    break
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if first is not None and r.status_code == 200:
                    ttfb.append(first)
                if drop and r.status_code == 200:
                    hangups += 1
                if r.status_code >= 500 and r.status_code != 503:
                    problems.append(f"{path}: {r.status_code}")
            retry = r.headers.get("retry-after")
    except httpx.HTTPError as e:
        with lock:
            problems.append(f"{path}: {type(e).__name__}: {e}")
        return
    # A full queue says when to come back, as clients do (the openai client backs off).
    if retry:
        time.sleep(float(retry))


def worker(seed):
    rng = random.Random(seed)
    with httpx.Client(timeout=300) as client:
        while time.time() < stop_at:
            one(client, rng)


before = metrics()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.time() - t0
time.sleep(1)
after = metrics()


def delta(k):
    return int(after.get(k, 0) - before.get(k, 0))


outcomes = {o: delta(f'edgellm_requests_total{{outcome="{o}"}}')
            for o in ["completed", "cancelled", "deadline", "queue_full", "shutting_down",
                      "refused", "failed"]}
received = delta("edgellm_requests_received_total")
tokens = delta("edgellm_completion_tokens_total")
q = sorted(ttfb)
print(f"{a.clients} clients, {elapsed:.0f} s: HTTP statuses {dict(sorted(statuses.items()))}, "
      f"{hangups} hung up mid-stream")
if q:
    print(f"time to first byte: p50 {statistics.median(q)*1000:.0f} ms, "
          f"p95 {q[int(len(q)*0.95)]*1000:.0f} ms, max {q[-1]*1000:.0f} ms")
print(f"daemon: received {received}, outcomes {outcomes}, {tokens} tokens "
      f"({tokens/elapsed:.1f} tokens/s)")
print(f"resident memory: {before.get('edgellm_resident_memory_bytes', 0)/2**20:.1f} MiB -> "
      f"{after.get('edgellm_resident_memory_bytes', 0)/2**20:.1f} MiB")
ended = sum(outcomes.values())
if received != ended:
    problems.append(f"received {received} but {ended} ended")
if after.get("edgellm_queue_depth", 0) != 0 or after.get("edgellm_requests_running", 0) != 0:
    problems.append("work left after the run")
for pr in problems[:20]:
    print("PROBLEM:", pr)
raise SystemExit(1 if problems else 0)
