"""The pod's FastAPI app (architecture Contract 3): OpenAI completions and chat completions, models, health, metrics.

Every request is tokenized here, submitted to the `AsyncEngine` (all choices before the response starts, so a full
queue is a clean 503 and never a broken stream), then streamed as SSE or collected. A client that goes away aborts
its engine requests: streaming responses are cancelled by Starlette on disconnect, non-streaming ones are watched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine import AsyncEngine, EngineDead, QueueFull, RequestOutput, RequestRejected, SamplingError
from . import metrics
from .errors import APIError, install_error_handlers
from .protocol import ChatCompletionRequest, CompletionRequest

RETRY_AFTER_S = 2


@dataclass
class PodSettings:
    model_name: str
    api_keys: list[str] = field(default_factory=list)  # --api-key values and the shared secret; empty = no auth
    max_body_bytes: int = 16 << 20
    default_max_tokens: int | None = None  # chat without max_tokens: None = the rest of the context


class BodyLimit:
    """413 for a body over the limit: a declared one (Content-Length) before anything reads it, and one sent without a
    length (chunked) once the bytes received pass the limit: the app then sees a disconnect instead of more body, and
    its answer to the cut-off request is replaced by the 413 (it never reached the engine: the routes read the whole
    body first). Plain ASGI on purpose: Starlette's BaseHTTPMiddleware wraps `receive` and would hide client
    disconnects from the non-streaming handlers."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self, size: int | None = None) -> APIError:
        what = f"request body of {size} bytes" if size is not None else "request body (sent without a length)"
        return APIError(413, f"{what} exceeds the limit of {self.limit} bytes", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            await self._error(int(size)).response()(scope, receive, send)
            return
        seen, over, started = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over and not started:
                return  # the 413 below answers instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._error().response()(scope, receive, send)


def create_app(aengine: AsyncEngine, tokenizer, settings: PodSettings) -> FastAPI:
    engine = aengine.engine
    rejected: dict[str, int] = {}
    keys = [k.encode() for k in settings.api_keys if k]

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        aengine.start()
        try:
            yield
        finally:
            aengine.stop()

    app = FastAPI(title="ringlinear pod", lifespan=lifespan)
    install_error_handlers(app)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def authorize(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        if not token or not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this pod serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------------------------------ info routes

    @app.get("/health")
    async def health():
        s = aengine.snapshot
        body = {"status": "ok" if aengine.alive else "unavailable", "model": settings.model_name,
                "queue_depth": s["queue_depth"], "running": s["running"]}
        if not aengine.alive:
            body["error"] = aengine.error or "engine not started"
        return JSONResponse(body, status_code=200 if aengine.alive else 503)

    @app.get("/metrics")
    async def metrics_route():
        dev = torch.cuda.memory_allocated() if engine.model.device.type == "cuda" else None
        return PlainTextResponse(metrics.render(aengine.snapshot, rejected, dev), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ringlinear",
                "max_model_len": engine.max_context}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    # ------------------------------------------------------------------------------------------ generation

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this pod has no tokenizer: send the prompt as token ids", param="prompt")
        return tokenizer.encode(text)

    def token_text(t: int) -> str:
        return tokenizer.decode([t]) if tokenizer is not None else ""

    async def submit_all(body, prompts: list[list[int]], max_tokens: int | None, default_max, logprobs: int | None):
        """Submit prompts x n engine requests; returns [(choice index, request id, queue)]. All or nothing."""
        base = uuid.uuid4().hex[:24]
        subs, rid = [], None
        try:
            for pi, prompt in enumerate(prompts):
                for j in range(body.n):
                    idx = pi * body.n + j
                    params = body.sampling(max_tokens, default_max(prompt), logprobs, idx)
                    rid = f"{base}-{idx}"
                    q = await aengine.submit(prompt, params, rid)
                    subs.append((idx, rid, q))
        except BaseException as e:
            for r in {s[1] for s in subs} | {rid}:
                if r is not None:
                    aengine.abort(r)
            if isinstance(e, QueueFull):
                rejected["queue_full"] = rejected.get("queue_full", 0) + 1
                raise APIError(503, f"the server is at capacity ({e}); retry later", code="overloaded",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            if isinstance(e, RequestRejected):
                rejected["invalid"] = rejected.get("invalid", 0) + 1
                raise APIError(400, str(e), param=e.param, code=e.code) from None
            if isinstance(e, SamplingError):
                raise APIError(400, str(e), param=e.param, code="invalid_value") from None
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            raise
        return base, subs

    async def merged(subs):
        """(choice index, RequestOutput) from all choices as they come; cancelling it aborts the unfinished ones."""
        out: asyncio.Queue = asyncio.Queue()

        async def pump(idx, rid, q):
            try:
                async for o in aengine.stream(q, rid):
                    await out.put((idx, o))
            except EngineDead as e:
                await out.put((idx, e))
            await out.put((idx, None))

        tasks = [asyncio.create_task(pump(*s)) for s in subs]
        try:
            left = len(tasks)
            while left:
                idx, o = await out.get()
                if isinstance(o, BaseException):
                    raise APIError(503, str(o), code="engine_unavailable")
                if o is None:
                    left -= 1
                    continue
                yield idx, o
        finally:
            for t in tasks:
                t.cancel()

    async def until_disconnect(request: Request):
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)

    async def collect(request: Request, subs) -> dict[int, list[RequestOutput]]:
        outs: dict[int, list[RequestOutput]] = {idx: [] for idx, _, _ in subs}

        async def run():
            async for idx, o in merged(subs):
                outs[idx].append(o)

        work = asyncio.create_task(run())
        watch = asyncio.create_task(until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left: cancelling aborts every engine request of this call
                work.cancel()
                raise APIError(499, "client disconnected")
        work.result()
        return outs

    def usage(prompts, finals: dict[int, RequestOutput], n: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(o.completion_tokens for o in finals.values())
        cached = sum(finals[i * n].cached_tokens for i in range(len(prompts)) if i * n in finals)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_errors(gen_fn):
        """A failure after the stream started (the engine died) ends it with an OpenAI error event, not a cut."""

        async def wrapped():
            try:
                async for item in gen_fn():
                    yield item
            except APIError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"

        return wrapped

    # ------------------------------------------------------------------------------------------ /v1/completions

    def completion_logprobs(outs: list[RequestOutput], offset: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for o in outs:
            for t, lp in zip(o.token_ids, o.logprobs):
                s = token_text(t)
                tokens.append(s)
                lps.append(lp.logprob if lp else None)
                tops.append({token_text(i): v for i, v in lp.top} if lp else None)
                offsets.append(pos)
                pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        body.check_unsupported()
        p = body.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            prompts = [list(p)]
        if not prompts or any(not x for x in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        base, subs = await submit_all(body, prompts, body.max_tokens, lambda _: 16, body.logprobs)
        cid, created, name = f"cmpl-{base}", int(time.time()), settings.model_name
        n_choices = len(subs)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            @sse_errors
            async def events():
                finals: dict[int, RequestOutput] = {}
                async for idx, o in merged(subs):
                    lp = completion_logprobs([o]) if body.logprobs is not None else None
                    chunk = {"id": cid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": idx, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}]}
                    if include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
                    if o.finished:
                        finals[idx] = o
                if include_usage:
                    yield sse({"id": cid, "object": "text_completion", "created": created, "model": name, "choices": [],
                               "usage": usage(prompts, finals, body.n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        outs = await collect(request, subs)
        choices, finals = [], {}
        for idx in range(n_choices):
            seq = outs[idx]
            finals[idx] = seq[-1]
            choices.append({"index": idx, "text": "".join(o.text for o in seq),
                            "logprobs": completion_logprobs(seq) if body.logprobs is not None else None,
                            "finish_reason": seq[-1].finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": usage(prompts, finals, body.n)}

    # ------------------------------------------------------------------------------------------ /v1/chat/completions

    def chat_logprobs(outs: list[RequestOutput]) -> dict:
        content = []
        for o in outs:
            for t, lp in zip(o.token_ids, o.logprobs):
                s = token_text(t)
                top = [{"token": token_text(i), "logprob": v, "bytes": list(token_text(i).encode())} for i, v in lp.top] if lp else []
                content.append({"token": s, "logprob": lp.logprob if lp else None, "bytes": list(s.encode()), "top_logprobs": top})
        return {"content": content}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check_unsupported()
        if tokenizer is None:
            raise APIError(400, "this pod has no tokenizer, so no chat template: use /v1/completions with token ids",
                           param="messages")
        messages = body.template_messages()
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # jinja errors from the model's template
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        prompts = [tokenizer.encode(text)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

        def default_max(prompt):
            rest = max(1, engine.max_context - len(prompt))
            return min(rest, settings.default_max_tokens) if settings.default_max_tokens else rest

        base, subs = await submit_all(body, prompts, max_tokens, default_max, logprobs)
        cid, created, name = f"chatcmpl-{base}", int(time.time()), settings.model_name

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, usage_=None, with_usage=True):
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
                if include_usage and with_usage:
                    c["usage"] = usage_
                return sse(c)

            @sse_errors
            async def events():
                for idx, _, _ in subs:
                    yield chunk([{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                finals: dict[int, RequestOutput] = {}
                async for idx, o in merged(subs):
                    delta = {"content": o.text} if o.text else {}
                    yield chunk([{"index": idx, "delta": delta, "logprobs": chat_logprobs([o]) if body.logprobs else None,
                                  "finish_reason": o.finish_reason}])
                    if o.finished:
                        finals[idx] = o
                if include_usage:
                    yield chunk([], usage(prompts, finals, body.n))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        outs = await collect(request, subs)
        choices, finals = [], {}
        for idx in range(len(subs)):
            seq = outs[idx]
            finals[idx] = seq[-1]
            choices.append({"index": idx, "message": {"role": "assistant", "content": "".join(o.text for o in seq)},
                            "logprobs": chat_logprobs(seq) if body.logprobs else None,
                            "finish_reason": seq[-1].finish_reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage(prompts, finals, body.n)}

    return app
