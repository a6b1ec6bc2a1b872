"""The pod's HTTP API in-process: OpenAI shapes, SSE framing, errors, auth, health and metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pod_helpers import KEY, SECRET, make_pod


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def client(tiny_model, tiny_tokenizer, request):
    app, _ = make_pod(tiny_model, tiny_tokenizer, max_body_bytes=64 << 10, max_context=512, overlap=request.param)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def golden_p0():
    from ringlinear.tools.golden import GOLDEN_DIR

    return json.loads((GOLDEN_DIR / "tiny.json").read_text())["prompts"][0]


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    out = []
    for b in blocks[:-2]:
        assert b.startswith("data: ") and "\n" not in b
        out.append(json.loads(b[6:]))
    return out


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_completion_matches_golden_greedy(client, golden_p0):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": golden_p0["text"], "max_tokens": 8, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == golden_p0["greedy_text"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(golden_p0["input_ids"]) and body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8


def test_token_prompts_several_prompts_and_n(client, golden_p0):
    ids = golden_p0["input_ids"]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["text"] == golden_p0["greedy_text"]
    r = client.post("/v1/completions", json={"prompt": [ids, ids[:4]], "max_tokens": 3, "temperature": 0.8, "seed": 7, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == len(ids) + 4 and body["usage"]["completion_tokens"] == 12
    again = client.post("/v1/completions", json={"prompt": [ids, ids[:4]], "max_tokens": 3, "temperature": 0.8, "seed": 7, "n": 2})
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in body["choices"]]  # seeded


def test_completion_stream_framing_and_usage(client, golden_p0):
    body = {"prompt": golden_p0["text"], "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == golden_p0["greedy_text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    assert all(e["usage"] is None for e in events[:-1])
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    no_usage = sse_events(client.post("/v1/completions", json={**body, "stream_options": None}).text)
    assert all("usage" not in e for e in no_usage)


def test_chat_uses_the_template(client, tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    expect = tiny_tokenizer.encode("<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi there<|role_end|><role>ASSISTANT</role>")
    assert body["usage"]["prompt_tokens"] == len(expect)
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    r = client.post("/v1/completions", json={"prompt": expect, "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"] == msg["content"]


def test_chat_stream(client):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0}
    full = client.post("/v1/chat/completions", json=body).json()
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}).text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == full["usage"]
    finish = events[-2]["choices"][0]["finish_reason"]
    assert finish == full["choices"][0]["finish_reason"]
    assert finish == ("length" if full["usage"]["completion_tokens"] == 5 else "stop")  # greedy may end on an eos id


def test_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "The ring", "max_tokens": 3, "temperature": 0, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 2 for t in lp["top_logprobs"])
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["logprob"] == pytest.approx(content[0]["top_logprobs"][0]["logprob"])  # greedy: the best one


BAD = [
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", None),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", None),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools", None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{'chat' if 'chat' in p else 'completions'}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_inputs_get_4xx_in_openai_shape(client, path, body, status, param, code):
    assert_error(client.post(path, json=body), status, param, code)


def test_malformed_requests(client):
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
                 code="invalid_json")
    assert_error(client.post("/v1/completions", json={"prompt": "x" * (80 << 10)}), 413, code="request_too_large")
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/completions"), 405)


def _chunked(payload: bytes, piece: int = 8 << 10):
    """The body as a generator: httpx sends it chunked, without a Content-Length."""
    for i in range(0, len(payload), piece):
        yield payload[i:i + piece]


def test_body_without_a_length_is_limited_too(client):
    """A chunked body over the limit gets the same 413 once its bytes pass the limit, and nothing of it reaches the
    engine; a chunked body under the limit is served as usual."""
    headers = {"content-type": "application/json"}
    engine_before = client.get("/health").json()
    big = json.dumps({"prompt": "x" * (80 << 10), "max_tokens": 1}).encode()
    r = client.post("/v1/completions", content=_chunked(big), headers=headers)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, code="request_too_large")
    assert "without a length" in r.json()["error"]["message"]
    assert client.get("/health").json()["running"] == engine_before["running"] == 0
    small = json.dumps({"prompt": "The ring", "max_tokens": 2, "temperature": 0}).encode()
    r = client.post("/v1/completions", content=_chunked(small, 5), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_auth(client):
    url, body = "/v1/completions", {"prompt": "x", "max_tokens": 1}
    err = assert_error(client.post(url, json=body, headers={"Authorization": ""}), 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert_error(client.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert client.post(url, json=body, headers={"Authorization": f"Bearer {SECRET}"}).status_code == 200
    assert client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_models_health_metrics_and_prefix_hits(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["max_model_len"] == 512
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and {"queue_depth", "running"} <= set(h)

    prompt = list(range(100, 250))  # 150 tokens: a snapshot at 128
    first = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()
    second = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    values = {l.split(" ")[0]: float(l.split(" ")[1]) for l in m.text.splitlines() if l and not l.startswith("#")}
    for name in ("ringlinear_queue_depth", "ringlinear_running_requests", "ringlinear_tokens_per_second",
                 "ringlinear_prefix_cache_hit_rate", "ringlinear_memory_in_use_bytes"):
        assert name in values
    assert values["ringlinear_prefix_cache_hits_total"] >= 1 and 0 < values["ringlinear_prefix_cache_hit_rate"] <= 1
    assert values["ringlinear_memory_in_use_bytes"] <= values["ringlinear_memory_budget_bytes"]
