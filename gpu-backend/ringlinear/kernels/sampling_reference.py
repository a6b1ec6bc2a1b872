"""Twin of the sampling kernel (csrc/sampling.cu): one token per row from logits and each row's parameters.

The draw is defined on integer weights, so that it is exact, independent of summation order and identical in the
kernel and here (ties in probability are kept or dropped together, never split by their position):

    x  = logits[row] / temperature (fp32), NaN -> -inf
    q  = floor(exp(x - max x) * 2^WEIGHT_BITS) as int64   (the most likely token weighs 2^40; q = 0 is never drawn)
    top_k:  theta_k = the k-th largest q (at least 1): keep q >= theta_k              (k = 0: off, theta_k = 1)
    top_p:  Q_k = the kept mass; P = min(Q_k, ceil(top_p * Q_k)) (float64);
            theta = the largest q value with sum(q >= theta) >= P: the most likely tokens that reach top_p of the mass
    draw:   Q = sum of kept q; t = min(floor(u * Q), Q - 1) (float64); the token is the first index whose cumulative
            kept weight (in token order) exceeds t
    greedy (temperature 0): the first index of the largest x; also what a row without any positive weight yields

A weight below 2^-40 of the most likely token's (a logit 27.7 below the row's maximum) is never drawn: at most
V x 2^-40 of the mass, ~1.4e-7 at Ring's 157k tokens.

`spec` [5, m] float64 on the host holds the m rows' parameters (one host-to-device copy a step): logits row index,
temperature (0 = greedy), top_k (0 = off), top_p (>= 1 = off), u in [0, 1).
"""

from __future__ import annotations

import torch

from ..ops.transfer import to_device

WEIGHT_BITS = 40
SPEC_FIELDS = ("row", "temperature", "top_k", "top_p", "u")


def sample_rows_reference(logits: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """logits [n, V] fp32, spec [5, m] float64 on the host (SPEC_FIELDS) -> token ids [m] int64, on logits' device.
    (The decisions on which parts to compute read the host copy: no host sync on CUDA.)"""
    m, V = spec.shape[1], logits.shape[1]
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    drawn = (spec[1] > 0).nonzero()[:, 0]  # read on the host: which parts run needs no host sync on CUDA
    dev_spec = to_device(spec, logits.device)
    x = logits[dev_spec[0].long()].float()
    x = x.masked_fill(x.isnan(), float("-inf"))
    out = x.argmax(-1)  # greedy rows: the first largest x
    if drawn.numel() == 0:
        return out
    sub = spec[:, drawn]
    max_k, any_nucleus = int(sub[2].max()), bool((sub[3] < 1).any())
    idx = to_device(drawn, logits.device)
    _, temperature, top_k, top_p, u = dev_spec[:, idx]
    x = x[idx] / temperature.float()[:, None]  # (-inf / t stays -inf: masking NaN first changes nothing)
    w = torch.exp(x - x.amax(-1, keepdim=True))
    q = torch.where(w > 0, (w * 2.0 ** WEIGHT_BITS).long(), 0)  # NaN (a row of -inf or +inf) -> 0

    k = top_k.long()
    theta = torch.ones(len(drawn), 1, dtype=torch.int64, device=q.device)
    if max_k > 0:
        kk = k.clamp(1, V)
        kth = q.topk(min(max_k, V), dim=-1).values.gather(1, (kk - 1)[:, None])
        theta = torch.where((k > 0)[:, None], kth.clamp_min(1), theta)
    q = q * (q >= theta)
    if any_nucleus:
        Qk = q.sum(-1)
        P = torch.minimum(torch.ceil(top_p * Qk.double()).long(), Qk)
        sq = q.sort(-1, descending=True).values
        j = torch.searchsorted(sq.cumsum(-1), P[:, None]).clamp_(max=V - 1)  # the first prefix reaching P
        theta_p = sq.gather(1, j)
        q = torch.where((top_p < 1)[:, None], q * (q >= theta_p), q)

    Q = q.sum(-1)
    target = torch.minimum((u * Q.double()).floor().long(), Q - 1)
    token = torch.searchsorted(q.cumsum(-1), target[:, None], right=True)[:, 0].clamp_(max=V - 1)
    out[idx] = torch.where(Q > 0, token, x.argmax(-1))  # no positive weight: the first largest x / temperature
    return out
