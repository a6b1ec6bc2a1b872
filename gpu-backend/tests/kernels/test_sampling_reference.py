"""The sampling twin (kernels/sampling_reference.py) against its definition written out row by row in plain Python
(sorted lists, integer sums), and the wrapper's argument checks."""

import math

import pytest
import torch

from ringlinear.kernels.sampling import sample_rows
from ringlinear.kernels.sampling_reference import WEIGHT_BITS, sample_rows_reference


def _weights(row: torch.Tensor, temperature: float) -> list[int]:
    """q of one row, computed with the same torch ops as the twin (exp's last bit is the library's)."""
    x = row.float() / torch.tensor(temperature, dtype=torch.float32)
    x = x.masked_fill(x.isnan(), float("-inf"))
    w = torch.exp(x - x.max())
    return [int(v * 2.0**WEIGHT_BITS) if v > 0 else 0 for v in w.tolist()]


def _by_definition(row: torch.Tensor, temperature: float, top_k: int, top_p: float, u: float) -> int:
    x = row.float().masked_fill(row.float().isnan(), float("-inf")).tolist()
    first_max = max(range(len(x)), key=lambda i: (x[i], -i))
    if temperature == 0:
        return first_max
    q = _weights(row, temperature)
    if top_k > 0:
        kth = sorted(q, reverse=True)[min(top_k, len(q)) - 1]
        q = [v if v >= max(kth, 1) else 0 for v in q]
    if top_p < 1:
        total = sum(q)
        need = min(total, math.ceil(top_p * float(total)))
        acc, theta = 0, 1
        for v in sorted(q, reverse=True):  # the largest value whose tokens at or above it reach `need`
            acc += v
            theta = v
            if acc >= need:
                break
        q = [v if v >= theta else 0 for v in q]
    total = sum(q)
    if total == 0:
        return first_max
    target = min(math.floor(u * float(total)), total - 1)
    acc = 0
    for i, v in enumerate(q):
        acc += v
        if acc > target:
            return i


def _spec(cols):
    return torch.tensor(list(zip(*cols)), dtype=torch.float64)


@pytest.mark.parametrize("scale", [0.02, 1.0, 4.0, 20.0])
def test_twin_follows_its_definition(scale):
    g = torch.Generator().manual_seed(int(scale * 100))
    V = 700
    logits = torch.randn(6, V, generator=g) * scale
    logits[1] = torch.round(logits[1] * 2) / 2  # many ties: kept or dropped together
    logits[2, ::3] = float("-inf")
    cols = []
    for i in range(60):
        r = i % 6
        t = [0.0, 1.0, 0.7, 1.3][i % 4]
        k = [0, 1, 5, 50, V, V + 10][i % 6]
        p = [1.0, 0.9, 0.5, 1e-6, 0.999][i % 5]
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        cols.append((r, t, k, p, u))
    cols += [(0, 1.0, 0, 0.9, 0.0), (0, 1.0, 0, 0.9, 1 - 2.0**-53), (3, 1.0, 3, 0.95, 1 - 2.0**-53)]
    spec = _spec(cols)
    got = sample_rows_reference(logits, spec).tolist()
    want = [_by_definition(logits[int(r)], t, int(k), p, u) for r, t, k, p, u in cols]
    assert got == want


def test_only_kept_tokens_are_drawn_and_ties_stay_together():
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.0, float("-inf")]])
    seen = {int(sample_rows_reference(logits, _spec([(0, 1.0, 1, 1.0, u / 50)]))[0]) for u in range(50)}
    assert seen == {0, 2}  # top_k = 1 with a tie at the top keeps both
    seen = {int(sample_rows_reference(logits, _spec([(0, 1.0, 0, 0.3, u / 50)]))[0]) for u in range(50)}
    assert seen == {0, 2}  # the tie's first token alone holds 0.3 of the mass, but ties are kept together
    seen = {int(sample_rows_reference(logits, _spec([(0, 1.0, 0, 1.0, u / 200)]))[0]) for u in range(200)}
    assert seen == {0, 1, 2, 3}  # -inf is never drawn


def test_rows_without_positive_weight_give_the_greedy_token():
    logits = torch.tensor([[float("nan")] * 4, [float("-inf"), 1.0, float("inf"), float("inf")],
                           [float("-inf")] * 4, [1.0, float("nan"), 3.0, 3.0]])
    spec = _spec([(r, 1.0, 0, 0.9, 0.5) for r in range(4)] + [(3, 0.0, 0, 1.0, 0.0)])
    assert sample_rows_reference(logits, spec).tolist() == [0, 2, 0, 3, 2]  # row 3 has weight: drawn


def test_wrapper_checks_name_the_field():
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="row of column 1"):
        sample_rows(logits, _spec([(0, 1.0, 0, 1.0, 0.5), (2, 1.0, 0, 1.0, 0.5)]))
    for bad, field in [((0, -1.0, 0, 1.0, 0.5), "temperature"), ((0, 1.0, 1.5, 1.0, 0.5), "top_k"),
                       ((0, 1.0, 0, 0.0, 0.5), "top_p"), ((0, 1.0, 0, 1.0, 1.0), "u")]:
        with pytest.raises(ValueError, match=field):
            sample_rows(logits, _spec([bad]))
    with pytest.raises(ValueError, match="float32"):
        sample_rows(logits.double(), _spec([(0, 1.0, 0, 1.0, 0.5)]))
    with pytest.raises(ValueError, match="host"):
        sample_rows(logits, _spec([(0, 1.0, 0, 1.0, 0.5)]).to("meta"))
    assert sample_rows(logits, torch.zeros(5, 0, dtype=torch.float64)).tolist() == []


def test_top_p_target_is_rounded_up():
    """P = ceil(top_p x Q): a nucleus that must hold a fraction of a weight unit more than the best token's weight
    takes the next token too (floor would stop at the best token)."""
    logits = torch.tensor([[0.0, -1.0, float("-inf")]])
    q0, q1 = _weights(logits[0], 1.0)[:2]
    assert q0 == 2**WEIGHT_BITS and 0 < q1 < q0
    top_p = (q0 + 0.5) / (q0 + q1)  # top_p x Q = q0 + 1/2: ceil needs token 1, floor would not
    assert sample_rows_reference(logits, _spec([(0, 1.0, 0, top_p, 1 - 2.0**-53)])).tolist() == [1]
    assert sample_rows_reference(logits, _spec([(0, 1.0, 0, q0 / (q0 + q1), 1 - 2.0**-53)])).tolist() == [0]
