#!/usr/bin/env python3
"""Fused attention elementwise kernels vs the runner's eager torch sequences, side by side in one run.

    PYTHONPATH=gpu-backend python3 bench/gpu_elementwise.py --out DIR [--quick]

Ring-mini shapes (H = 16, d = 128, rotary 64, 4 KV heads in the softmax layers, group_norm_size 4 = 4 groups of 512)
at N = 1, 64, 4096, 32768, 131072 tokens per step (--sizes):

    lightning-prologue  bf16 qkv [N, 48*128] -> fp32 cast, QK RMSNorm, partial RoPE (runner._lightning) vs ours
                        with fp32 output (the same bytes) and bf16 output
    softmax-prologue    bf16 qkv [N, 24*128] -> bf16 QK RMSNorm, fp32 RoPE, bf16 q/k (runner._softmax) vs ours
                        (norm_dtype=bf16: the same numbers)
    gate                fp32 o [N, 2048], bf16 gate -> group RMSNorm * sigmoid(gate) -> bf16 (runner._lightning), and
                        with the bf16 o that prompt-only steps pass straight from the prefill kernel
    add-rmsnorm         bf16 residual x [N, 2048] + bf16 attention output, then RMSNorm (runner._forward's
                        `x = x + a` then post_attention_layernorm) vs ours (both s and the normed rows written)
    rmsnorm             bf16 [N, 2048] -> RMSNorm alone (input_layernorm of layer 0, the final norm) vs ours

The peer excludes rope_cos_sin, which the runner computes once per step for all layers; ours builds those tables
(ops.rope_cos_sin, eager) in every call, except in the "tables" rows, which pass them as the runner does. Norm weights are passed to ours in fp32 (convert once at load: bf16 weights cost a conversion launch
per call). GB/s counts the bytes ours must move (inputs read once, outputs written once), for both columns; % copy
is against a device-to-device copy measured in the same run. --quick: small N and few repetitions; it also runs on
a CPU (the twins then stand in for the kernels) as a smoke test of the harness. Writes DIR/gpu_elementwise.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_timing import copy_gbs, timer  # noqa: E402
from ringlinear.kernels import _build  # noqa: E402
from ringlinear.kernels.elementwise import add_rms_norm, gated_group_rmsnorm, qkv_prologue  # noqa: E402
from ringlinear.kernels.elementwise_reference import (  # noqa: E402
    add_rms_norm_bytes,
    gated_group_rmsnorm_bytes,
    qkv_prologue_bytes,
)
from ringlinear.ops import apply_partial_rope, group_rms_norm, rms_norm, rope_cos_sin  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402

MINI = PRESETS["ring-mini-linear-2.0"]
H, HKV, D = MINI["num_attention_heads"], MINI["num_key_value_heads"], MINI["head_dim"]
ROT = int(D * MINI["partial_rotary_factor"])
GROUPS = MINI["group_norm_size"]  # number of groups (ops.group_rms_norm's argument)
THETA, EPS = float(MINI["rope_theta"]), MINI["rms_norm_eps"]
C = H * D


def peer_lightning_prologue(qkv_proj, cos, sin, qw, kw):
    N = qkv_proj.shape[0]
    qkv = qkv_proj.to(torch.float32)  # linear_silu is false for Ring-mini
    q, k, v = qkv.view(1, N, 3, H, D).unbind(2)
    q, k = rms_norm(q, qw, EPS), rms_norm(k, kw, EPS)
    return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v


def peer_softmax_prologue(qkv_proj, cos, sin, qw, kw):
    N = qkv_proj.shape[0]
    q, k, v = qkv_proj.view(1, N, H + 2 * HKV, D).split([H, HKV, HKV], dim=2)
    q, k = rms_norm(q, qw, EPS), rms_norm(k, kw, EPS)
    q = apply_partial_rope(q.to(torch.float32), cos, sin).to(qkv_proj.dtype)
    k = apply_partial_rope(k.to(torch.float32), cos, sin).to(qkv_proj.dtype)
    return q, k, v


def peer_gate(o, gate, w):
    N = o.shape[0]
    y = group_rms_norm(o.reshape(1, N, C), w, GROUPS, EPS)
    return (y * torch.sigmoid(gate.to(torch.float32))).to(torch.bfloat16)


def peer_add_rms_norm(x, a, w):
    s = x + a
    return s, rms_norm(s, w, EPS)


# ------------------------------------------------------------------------------------ cases
def cases(N: int, dev: torch.device):
    g = torch.Generator(device=dev).manual_seed(N)
    pos = torch.randint(0, 100_000, (N,), device=dev, generator=g)
    cos, sin = rope_cos_sin(pos[None], ROT, THETA, torch.float32)
    qw = (torch.rand(D, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    kw = (torch.rand(D, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    qw32, kw32 = qw.float(), kw.float()
    lin = torch.randn(N, 3 * H * D, device=dev, generator=g).to(torch.bfloat16)
    soft = torch.randn(N, (H + 2 * HKV) * D, device=dev, generator=g).to(torch.bfloat16)
    o = torch.randn(N, C, device=dev, generator=g)
    gate = torch.randn(N, C, device=dev, generator=g).to(torch.bfloat16)
    gw = (torch.rand(C, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    gw32 = gw.float()
    common = dict(q_norm_weight=qw32, k_norm_weight=kw32, eps=EPS, rotary_dim=ROT, rope_theta=THETA)
    for out_dtype in (torch.float32, torch.bfloat16):
        yield (f"lightning-prologue out={str(out_dtype)[6:]}",
               lambda: peer_lightning_prologue(lin, cos, sin, qw, kw),
               lambda od=out_dtype: qkv_prologue(lin, pos, H, H, D, silu=False, out_dtype=od, **common),
               qkv_prologue_bytes(N, H, H, D, torch.bfloat16, out_dtype))
    yield ("lightning-prologue tables out=bfloat16",  # the runner's call: the step's rope_cos_sin tables
           lambda: peer_lightning_prologue(lin, cos, sin, qw, kw),
           lambda: qkv_prologue(lin, pos, H, H, D, silu=False, out_dtype=torch.bfloat16, rope_cos_sin=(cos, sin), **common),
           qkv_prologue_bytes(N, H, H, D, torch.bfloat16, torch.bfloat16))
    for tables in (None, (cos, sin)):
        yield (f"softmax-prologue {'tables ' if tables else ''}out=bfloat16",
               lambda: peer_softmax_prologue(soft, cos, sin, qw, kw),
               lambda t=tables: qkv_prologue(soft, pos, H, HKV, D, silu=False, norm_dtype=torch.bfloat16,
                                             rope_cos_sin=t, **common),
               qkv_prologue_bytes(N, H, HKV, D, torch.bfloat16, torch.bfloat16))
    yield ("gate out=bfloat16", lambda: peer_gate(o, gate, gw), lambda: gated_group_rmsnorm(o, gate, gw32, GROUPS, EPS),
           gated_group_rmsnorm_bytes(N, C, torch.bfloat16, torch.bfloat16))
    o16 = o.to(torch.bfloat16)  # the prefill kernel's output, as prompt-only steps pass it
    yield ("gate o=bf16 out=bfloat16", lambda: peer_gate(o16, gate, gw),
           lambda: gated_group_rmsnorm(o16, gate, gw32, GROUPS, EPS),
           gated_group_rmsnorm_bytes(N, C, torch.bfloat16, torch.bfloat16, torch.bfloat16))
    hidden = MINI["hidden_size"]
    x = torch.randn(N, hidden, device=dev, generator=g).to(torch.bfloat16)
    a = torch.randn(N, hidden, device=dev, generator=g).to(torch.bfloat16)
    nw = (torch.rand(hidden, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    yield ("add-rmsnorm bfloat16", lambda: peer_add_rms_norm(x, a, nw), lambda: add_rms_norm(x, a, nw, EPS),
           add_rms_norm_bytes(N, hidden, torch.bfloat16, True))
    yield ("rmsnorm bfloat16", lambda: rms_norm(x, nw, EPS), lambda: add_rms_norm(x, None, nw, EPS),
           add_rms_norm_bytes(N, hidden, torch.bfloat16, False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1,64,4096,32768,131072", help="comma list of token counts N")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not a.quick:
        sys.exit("gpu_elementwise: needs a CUDA device (or --quick for the CPU smoke test)")
    kernels = dev.type == "cuda" and _build.available()
    _, ms = timer(dev, a.quick)
    bench = lambda fn: ms(fn) * 1e3  # noqa: E731 - microseconds
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "kernels": kernels, "quick": a.quick, "shapes": dict(H=H, Hkv=HKV, d=D, rotary_dim=ROT, groups=GROUPS),
           "copy_gbs": None, "rows": [], "errors": {}}
    res["copy_gbs"] = cbw = copy_gbs(dev, ms, a.quick)
    print(f"device {res['device']}  kernels={kernels}  copy {cbw:.0f} GB/s", flush=True)
    hdr = f"{'case':40s} {'N':>6s} {'peer us':>10s} {'ours us':>10s} {'ratio':>7s} {'ours GB/s':>10s} {'% copy':>7s}"
    print(hdr)
    for N in ((1, 64, 512) if a.quick else [int(x) for x in a.sizes.split(",")]):
        for name, peer, ours, nbytes in cases(N, dev):
            try:
                tp, to = bench(peer), bench(ours)
            except Exception as exc:  # noqa: BLE001 - record and keep measuring the other cases
                res["errors"][f"{name} N={N}"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                continue
            gbs = nbytes / to / 1e3
            row = dict(case=name, N=N, peer_us=tp, ours_us=to, ratio=tp / to, bytes=nbytes, ours_gbs=gbs,
                       peer_gbs=nbytes / tp / 1e3, pct_copy=100 * gbs / cbw)
            res["rows"].append(row)
            print(f"{name:40s} {N:6d} {tp:10.1f} {to:10.1f} {tp / to:6.2f}x {gbs:10.0f} {row['pct_copy']:6.1f}%",
                  flush=True)
    (out / "gpu_elementwise.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'gpu_elementwise.json'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
