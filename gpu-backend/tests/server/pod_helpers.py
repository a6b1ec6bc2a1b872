"""Server test helpers: the pod app over the tiny checkpoint, a real uvicorn server in a thread, polling."""

from __future__ import annotations

import socket
import threading
import time

KEY, SECRET = "sk-direct-test", "pod-shared-secret"


def make_pod(model, tokenizer, max_body_bytes=1 << 20, **engine_kw):
    from engine_helpers import make_engine

    from ringlinear.engine import AsyncEngine
    from ringlinear.server import PodSettings, create_app

    engine_kw.setdefault("max_batch", 4)
    engine = make_engine(model, tokenizer=tokenizer, eos_ids=tokenizer.eos_ids, **engine_kw)
    aengine = AsyncEngine(engine)
    app = create_app(aengine, tokenizer, PodSettings("tiny", api_keys=[KEY, SECRET], max_body_bytes=max_body_bytes))
    return app, aengine


class LiveServer:
    """uvicorn on a free localhost port, in a thread (the real HTTP stack: disconnects, SSE framing)."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(cond, timeout=10.0, every=0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()
