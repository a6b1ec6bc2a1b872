import torch

from ringlinear.ops import group_rms_norm, rms_norm, route


def test_group_rms_norm_differs_from_plain_rms_norm():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    grouped = group_rms_norm(x, w, groups=2, eps=1e-6)
    plain = rms_norm(x, w, eps=1e-6)
    assert not torch.allclose(grouped, plain)
    # each group is normalised on its own: both halves come out identical here (second = 10 x first)
    torch.testing.assert_close(grouped[0, :4], grouped[0, 4:])
    torch.testing.assert_close(group_rms_norm(x, w, groups=1, eps=1e-6), plain)


def test_group_rms_norm_applies_weight_and_checks_divisibility():
    x = torch.randn(3, 12, dtype=torch.float64)
    w = torch.randn(12, dtype=torch.float64)
    per = x.view(3, 3, 4)
    expect = (per * torch.rsqrt(per.pow(2).mean(-1, keepdim=True) + 1e-6)).view(3, 12) * w
    torch.testing.assert_close(group_rms_norm(x, w, 3, 1e-6), expect)
    try:
        group_rms_norm(x, w, 5, 1e-6)
    except ValueError as e:
        assert "not divisible" in str(e)
    else:
        raise AssertionError("expected ValueError")


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def test_router_group_masking():
    # 4 groups of 2 experts; keep 2 groups, pick 2 experts. Expert 7 alone is the best single score,
    # but its group (3) sums lower than groups 0 and 1, so it must not be chosen.
    p = [0.80, 0.79, 0.70, 0.69, 0.10, 0.10, 0.10, 0.95]
    ids, w = route(_logit([p]), None, n_group=4, topk_group=2, top_k=2)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_router_bias_selects_but_does_not_weight():
    p = [0.6, 0.5, 0.4, 0.3]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    ids, w = route(_logit([p]), bias, n_group=1, topk_group=1, top_k=2, routed_scaling_factor=2.5)
    assert ids.tolist() == [[3, 0]]  # 0.3 + 0.5 beats 0.6
    torch.testing.assert_close(w[0], torch.tensor([0.3, 0.6], dtype=torch.float64) / 0.9 * 2.5)


def test_router_ties_go_to_lower_index():
    p = [0.5] * 8
    ids, _ = route(_logit([p]), None, n_group=4, topk_group=2, top_k=3)
    assert ids.tolist() == [[0, 1, 2]]  # groups 0 and 1 kept (tie), experts in index order


def test_router_without_norm_keeps_sigmoid_scores():
    p = [0.9, 0.2, 0.3, 0.1]
    ids, w = route(_logit([p]), None, n_group=2, topk_group=1, top_k=2, norm_topk_prob=False)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0], torch.tensor([0.9, 0.2], dtype=torch.float64))
