"""`python -m ringlinear serve` options: checkpoint and random-weight pods, sizes, clear refusals."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient

from ringlinear.engine import EngineDead, SamplingParams
from ringlinear.server.cli import build_parser, build_pod, check_weights_fit, parse_size


def test_parse_size():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_checkpoint_pod_serves(tiny_ckpt):
    args = build_parser().parse_args(["--model", str(tiny_ckpt), "--memory-budget", "32MiB", "--max-context", "512",
                                      "--api-key", "k1", "--shared-secret", "s1"])
    app, aengine = build_pod(args)
    assert aengine.engine.model.dtype == torch.float32 and aengine.engine.max_context == 512
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/completions", headers={"Authorization": "Bearer s1"}, json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_random_weights_pod(tiny_ckpt):
    args = build_parser().parse_args(["--random-weights", str(tiny_ckpt / "config.json"), "--tokenizer", str(tiny_ckpt),
                                      "--dtype", "bfloat16", "--memory-budget", "32MiB", "--max-context", "512",
                                      "--served-model-name", "rand"])
    app, aengine = build_pod(args)
    assert aengine.engine.model.dtype == torch.bfloat16
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "rand", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_bad_options_exit_with_a_message(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="memory budget"):
        build_pod(build_parser().parse_args(["--model", str(tiny_ckpt), "--memory-budget", "1MiB"]))
    with pytest.raises(SystemExit, match="config.json not found|no model.safetensors"):
        build_pod(build_parser().parse_args(["--model", str(tmp_path)]))


def test_weights_that_cannot_fit_the_gpu_are_refused_before_loading(tiny_model, monkeypatch):
    """Ring-flash-linear-2.0 in bf16 (~208 GB) on a GPU with 139 GiB free, Ring-mini in fp32 on a host with 48 GiB
    available: a message naming both sizes, before any tensor is read; a model that fits passes."""
    from ringlinear.config import RingLinearConfig
    from ringlinear.tools.params import PRESETS

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 << 30, 140 << 30))
    cuda = torch.device("cuda", 0)
    flash = RingLinearConfig.from_dict(PRESETS["ring-flash-linear-2.0"])
    with pytest.raises(SystemExit, match=r"need 194\.\d GiB in bfloat16 but cuda:0 has 139\.0 GiB free"):
        check_weights_fit(flash, torch.bfloat16, cuda)
    check_weights_fit(RingLinearConfig.from_dict(PRESETS["ring-mini-linear-2.0"]), torch.bfloat16, cuda)  # ~30.6 GiB
    check_weights_fit(tiny_model.config, torch.float32, cuda)
    # the CPU: the host's available memory (Ring-mini in fp32 is ~61 GiB)
    import ringlinear.server.cli as cli

    monkeypatch.setattr(cli, "host_available_bytes", lambda: 48 << 30)
    mini = RingLinearConfig.from_dict(PRESETS["ring-mini-linear-2.0"])
    with pytest.raises(SystemExit, match=r"need 61\.2 GiB in float32 but this host has 48\.0 GiB of memory available"):
        check_weights_fit(mini, torch.float32, torch.device("cpu"))
    check_weights_fit(mini, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(cli, "host_available_bytes", lambda: None)  # not Linux: nothing to compare with
    check_weights_fit(flash, torch.float32, torch.device("cpu"))


def test_host_available_bytes_reads_meminfo(tmp_path, monkeypatch):
    import builtins
    from pathlib import Path

    from ringlinear.server.cli import host_available_bytes

    if Path("/proc/meminfo").exists():
        assert host_available_bytes() > 0
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   65536000 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(fake if f == "/proc/meminfo" else f, *a, **k))
    assert host_available_bytes() == 65536000 * 1024
    fake.write_text("MemTotal:       131072000 kB\n")  # a kernel without MemAvailable
    assert host_available_bytes() is None


def test_stopped_engine_fails_waiting_streams(tiny_model):
    from engine_helpers import make_engine

    from ringlinear.engine import AsyncEngine

    aengine = AsyncEngine(make_engine(tiny_model))
    aengine.start()

    async def go():
        out = await aengine.submit([5, 6, 7], SamplingParams(max_tokens=900, temperature=0), "r1")
        got = []
        aengine.stop()
        with pytest.raises(EngineDead):
            async for o in aengine.stream(out, "r1"):
                got.append(o)
        return got

    asyncio.run(go())
    assert not aengine.alive


def test_call_runs_on_the_engine_thread_and_raises_there_errors_here(tiny_model):
    """The server's warm-up goes through AsyncEngine.call: torch keeps cuDNN plans per thread, so what it builds must be
    built on the thread that runs the steps. A failing call raises to the caller and leaves the loop serving."""
    import threading

    from engine_helpers import make_engine

    from ringlinear.engine import AsyncEngine

    aengine = AsyncEngine(make_engine(tiny_model))
    try:
        assert aengine.call(lambda: threading.current_thread().name) == "ringlinear-engine"
        assert aengine.call(aengine.engine.warm_up, 64).tokens == 64
        with pytest.raises(ZeroDivisionError):
            aengine.call(lambda: 1 / 0)
        assert aengine.alive

        async def go():
            out = await aengine.submit([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), "r1")
            return [o async for o in aengine.stream(out, "r1")]

        assert len(asyncio.run(go())) == 3
    finally:
        aengine.stop()
    with pytest.raises(EngineDead):  # answered, not left waiting on a loop that is gone
        aengine.call(lambda: 1)


def test_step_budgets_default_by_device_and_follow_the_options(tiny_ckpt):
    base = ["--model", str(tiny_ckpt), "--memory-budget", "32MiB", "--max-context", "512"]
    _, aengine = build_pod(build_parser().parse_args(base))
    ec = aengine.engine.config
    assert (ec.max_step_tokens, ec.max_prefill_step_tokens) == (512, 512)  # cpu: one budget
    _, aengine = build_pod(build_parser().parse_args(base + ["--max-step-tokens", "128", "--max-prefill-step-tokens",
                                                             "1024"]))
    ec = aengine.engine.config
    assert (ec.max_step_tokens, ec.max_prefill_step_tokens) == (128, 1024)
    with pytest.raises(SystemExit, match="max_prefill_step_tokens"):
        build_pod(build_parser().parse_args(base + ["--max-step-tokens", "256", "--max-prefill-step-tokens", "128"]))


def test_dependent_launch_follows_the_option(tiny_ckpt, monkeypatch):
    """--no-dependent-launch switches the kernels' programmatic dependent launch off before the engine (and its
    decode graphs) exist; the default switches it on."""
    from ringlinear import kernels

    calls = []
    monkeypatch.setattr(kernels, "set_programmatic_launch", calls.append)
    base = ["--model", str(tiny_ckpt), "--memory-budget", "32MiB", "--max-context", "512"]
    build_pod(build_parser().parse_args(base))
    build_pod(build_parser().parse_args(base + ["--no-dependent-launch"]))
    assert calls == [True, False]


def test_overlap_defaults_by_device_and_follows_the_option(tiny_ckpt):
    base = ["--model", str(tiny_ckpt), "--memory-budget", "32MiB", "--max-context", "512"]
    assert build_pod(build_parser().parse_args(base))[1].engine.overlap is False  # cpu: nothing to overlap with
    assert build_pod(build_parser().parse_args(base + ["--no-overlap"]))[1].engine.config.overlap is False
    assert build_pod(build_parser().parse_args(base))[1].engine.config.reply_snapshots is True
    assert build_pod(build_parser().parse_args(base + ["--no-reply-snapshots"]))[1].engine.config.reply_snapshots is False
