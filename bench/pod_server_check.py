"""Hit a running pod once: wait for /health, one completion, one streamed chat (with usage), a few /metrics lines.

    python bench/pod_server_check.py --url http://127.0.0.1:8000 [--key SECRET] [--wait 300]
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
    m = c.get("/metrics").text
    print("\n".join(l for l in m.splitlines() if l.startswith("ringlinear_") and any(
        k in l for k in ("tokens_total", "memory", "hit_rate", "device_memory"))))


if __name__ == "__main__":
    main()
