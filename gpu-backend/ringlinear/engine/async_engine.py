"""`AsyncEngine`: the engine's step loop on its own thread, fed and drained from asyncio.

The asyncio side never touches the engine's state: `submit` and `abort` put commands on a queue that the loop
thread applies between steps (so an abort frees the slot before the next step runs), and outputs come back
through `loop.call_soon_threadsafe` into one asyncio.Queue per request. `call` runs a function on the loop thread
(the server's start-up warm-up: torch keeps cuDNN plans per thread, so they must be built where steps run).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import traceback
from dataclasses import dataclass

from .engine import Engine, QueueFull, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("ringlinear.engine")


class EngineDead(RuntimeError):
    pass


@dataclass
class _Submit:
    prompt: list[int]
    params: SamplingParams
    request_id: str
    done: "asyncio.Future"
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.snapshot = engine.stats()  # refreshed by the loop thread; read by /health and /metrics

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ringlinear-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def call(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on the loop thread between steps (starting the thread if needed) and return its
        result, or raise its exception, here. Blocking: for start-up work, not for an event loop."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        if self._stop.is_set():
            raise EngineDead("the engine was stopped")
        self.start()
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", (fn, args, kwargs, fut)))
        self._wake.set()
        return fut.result()

    # ------------------------------------------------------------------------------------------ asyncio side

    async def submit(self, prompt: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Queue a request. Raises QueueFull / RequestRejected / SamplingError as the engine would."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        loop = asyncio.get_running_loop()
        sub = _Submit(prompt, params, request_id, loop.create_future(), asyncio.Queue(), loop)
        self._cmds.put(("add", sub))
        self._wake.set()
        await sub.done  # raises the engine's refusal, if any
        return sub.out

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))
        self._wake.set()

    async def stream(self, out: asyncio.Queue, request_id: str):
        """Async iterator of a submitted request's RequestOutputs until finished; aborts it if the consumer goes away."""
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str):
        """submit + stream."""
        try:
            out = await self.submit(prompt, params, request_id)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        async for o in self.stream(out, request_id):
            yield o

    # ------------------------------------------------------------------------------------------ loop thread

    def _apply_commands(self) -> None:
        eng = self.engine
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    eng.add_request(arg.prompt, arg.params, arg.request_id)
                except (QueueFull, ValueError) as e:
                    arg.loop.call_soon_threadsafe(_settle, arg.done, e)
                    continue
                self._streams[arg.request_id] = (arg.loop, arg.out)
                arg.loop.call_soon_threadsafe(_settle, arg.done, None)
            elif kind == "abort":
                eng.abort(arg)
                self._streams.pop(arg, None)
            elif kind == "call":
                fn, args, kwargs, fut = arg
                try:
                    fut.set_result(fn(*args, **kwargs))
                except Exception as e:  # the caller's to handle; the loop goes on
                    fut.set_exception(e)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            target = self._streams.get(o.request_id)
            if target is None:
                continue
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, o)
            if o.finished:
                self._streams.pop(o.request_id, None)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if not eng.has_work():
                    self.snapshot = eng.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._deliver(eng.step())
                self.snapshot = eng.stats()
        except Exception as e:  # a broken step fails every request loudly instead of hanging them
            self.error = f"engine step failed: {e!r}"
            log.error("%s\n%s", self.error, traceback.format_exc())
        # stopped or broken: nobody may wait forever on an output that will not come
        reason = EngineDead(self.error or "the engine was stopped")
        for loop, q in list(self._streams.values()):
            loop.call_soon_threadsafe(q.put_nowait, reason)
        self._streams.clear()
        while True:  # submissions that raced the stop
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                arg.loop.call_soon_threadsafe(_settle, arg.done, reason)
            elif kind == "call":
                arg[3].set_exception(EngineDead(str(reason)))


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
