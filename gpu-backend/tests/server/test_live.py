"""Against a real uvicorn server: the official openai client, client disconnects, and a flood beyond capacity."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from pod_helpers import KEY, SECRET, LiveServer, make_pod, wait_until


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def live(tiny_model, tiny_tokenizer, request):
    app, aengine = make_pod(tiny_model, tiny_tokenizer, max_batch=4, max_context=1024, overlap=request.param)
    server = LiveServer(app)
    yield server, aengine
    server.close()


@pytest.fixture(scope="module")
def golden_p0():
    from ringlinear.tools.golden import GOLDEN_DIR

    return json.loads((GOLDEN_DIR / "tiny.json").read_text())["prompts"][0]


def test_openai_client(live, golden_p0):
    server, _ = live
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SECRET, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]

    c = client.completions.create(model="tiny", prompt=golden_p0["text"], max_tokens=8, temperature=0)
    assert c.choices[0].text == golden_p0["greedy_text"] and c.usage.completion_tokens == 8
    stream = client.completions.create(model="tiny", prompt=golden_p0["text"], max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == golden_p0["greedy_text"]

    msgs = [{"role": "user", "content": "Hello there"}]
    # ignore_eos (vLLM extension): greedy on the tiny model may pick an eos id, and this test wants all 6 tokens
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def _idle(aengine):
    s = aengine.engine.stats()
    return s["running"] == 0 and s["queue_depth"] == 0 and s["slots_used"] == 0


def test_stream_disconnect_frees_the_slot(live):
    server, aengine = live
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "The ring", "max_tokens": 900, "temperature": 0,
                                                       "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one token arrived; now hang up
            assert aengine.engine.stats()["running"] == 1
    assert wait_until(lambda: _idle(aengine), timeout=10), aengine.engine.stats()
    assert aengine.engine.stats()["generation_tokens_total"] < 900


def test_non_stream_disconnect_frees_the_slot(live):
    server, aengine = live
    before = aengine.engine.stats()["generation_tokens_total"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "The ring", "max_tokens": 900, "temperature": 0, "ignore_eos": True})
    assert wait_until(lambda: _idle(aengine), timeout=10), aengine.engine.stats()
    assert aengine.engine.stats()["generation_tokens_total"] - before < 900


def test_chunked_body_over_the_limit_gets_413_over_http(live):
    """Through uvicorn: a body sent chunked (no Content-Length) past the pod's limit (1 MiB here) is answered 413 in
    the OpenAI shape, and the server keeps serving."""
    server, aengine = live

    def body():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * (32 << 10)
        yield b'", "max_tokens": 1}'

    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        try:
            r = c.post("/v1/completions", content=body())
        except httpx.HTTPError as exc:  # the server may close the connection while the client is still sending
            pytest.fail(f"no 413 response: {exc!r}")
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        ok = c.post("/v1/completions", json={"prompt": "The ring", "max_tokens": 1, "temperature": 0})
        assert ok.status_code == 200, ok.text
    assert _idle(aengine)


def test_flood_is_refused_cleanly_and_no_stream_breaks(tiny_model, tiny_tokenizer):
    """2 slots and a queue of 2: a burst of 12 streams gets 503 + Retry-After for the excess; every accepted
    stream runs to its end ([DONE], full usage). How many are accepted depends on how fast the engine admits
    while the burst arrives, so only the invariants are checked."""
    app, aengine = make_pod(tiny_model, tiny_tokenizer, max_batch=2, max_queue=2, max_context=256)
    server = LiveServer(app)
    try:
        async def one(c: httpx.AsyncClient, i: int):
            r = await c.post("/v1/completions", json={"prompt": f"Request number {i}", "max_tokens": 24, "temperature": 0,
                                                      "ignore_eos": True, "stream": True,
                                                      "stream_options": {"include_usage": True}})
            return r.status_code, r.headers, r.text

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
                return await asyncio.gather(*(one(c, i) for i in range(12)))

        results = asyncio.run(burst())
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(ok) + len(refused) == 12 and ok and refused, [r[0] for r in results]
        for _, headers, text in refused:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(text)["error"]["code"] == "overloaded"
        for _, _, text in ok:
            assert text.endswith("data: [DONE]\n\n")
            events = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
            assert events[-1]["usage"]["completion_tokens"] == 24
            assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
        stats = aengine.engine.stats()
        assert stats["memory_in_use_bytes"] <= stats["memory_budget_bytes"]
        assert wait_until(lambda: _idle(aengine), timeout=5)
        m = httpx.get(server.url + "/metrics").text
        assert f'ringlinear_requests_rejected_total{{reason="queue_full"}} {len(refused)}' in m
    finally:
        server.close()
