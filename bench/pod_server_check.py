"""Hit a running pod once: wait for /health, one completion, one streamed chat (with usage), a few /metrics lines;
with --long-prompts, also each length as a token-id prompt twice in a row (max_tokens 1): the first request of a
length against the repeat shows what a request still pays at start-up (plans built on first use).

    python bench/pod_server_check.py --url http://127.0.0.1:8000 [--key SECRET] [--wait 300] [--long-prompts 100000]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--long-prompts", default="", help="comma-separated prompt lengths in tokens, each sent twice")
    a = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}
    c = httpx.Client(base_url=a.url, headers=headers, timeout=600)
    t0 = time.time()
    while True:
        try:
            h = c.get("/health")
            if h.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.time() - t0 > a.wait:
            raise SystemExit("pod did not become healthy")
        time.sleep(1)
    print(f"health after {time.time() - t0:.1f} s: {h.json()}")
    model = c.get("/v1/models").json()["data"][0]["id"]
    t = time.time()
    r = c.post("/v1/completions", json={"model": model, "prompt": "The ring turns and the river runs.", "max_tokens": 32,
                                        "temperature": 0, "ignore_eos": True})
    body = r.json()
    print(f"completion {r.status_code} in {time.time() - t:.2f} s: usage={body.get('usage')} "
          f"finish={body['choices'][0]['finish_reason']!r}")
    t, first, n = time.time(), None, 0
    with c.stream("POST", "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                                                        "max_tokens": 32, "stream": True, "ignore_eos": True,
                                                        "stream_options": {"include_usage": True}}) as s:
        usage = None
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"]:
                n += 1
                first = first or time.time()
    print(f"chat stream {s.status_code}: {n} chunks, first after {first - t:.2f} s, all in {time.time() - t:.2f} s, usage={usage}")
    for i, n in enumerate(int(x) for x in a.long_prompts.split(",") if x):
        times = []
        for rep in range(2):
            ids = [(7919 * (j + 1000 * i + 500 * rep)) % 3900 + 100 for j in range(n)]  # distinct: no prefix-cache hit
            t = time.time()
            r = c.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0})
            times.append(time.time() - t)
            if r.status_code != 200:
                raise SystemExit(f"long prompt of {n} tokens: HTTP {r.status_code} {r.text[:300]}")
        print(f"long prompt {n} tokens: first {times[0]:.3f} s, repeat {times[1]:.3f} s")
    m = c.get("/metrics").text
    print("\n".join(l for l in m.splitlines() if l.startswith("ringlinear_") and any(
        k in l for k in ("tokens_total", "memory", "hit_rate", "device_memory"))))


if __name__ == "__main__":
    main()
