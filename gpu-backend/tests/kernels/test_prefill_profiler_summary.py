"""CPU tests: the prefill phase profiler's summaries (bench/profile_prefill_phases.py) on made-up stamps."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from profile_prefill_phases import output_tail, summarize, walk_clock, warpgroup_lag  # noqa: E402


def _stamps(n_items, heads, slot_tail_ns, other_tail_ns):
    """[pass][CTA][stamp] ns: state CTAs start at 1000; output CTA i (item i % n_items) walks to 20 000, then ends
    after a tail that depends on whether its item writes a slot (the last item here)."""
    st = torch.zeros(3, 4096, 8, dtype=torch.long)
    st[0, :4, 0] = 1000
    for cta in range(n_items * heads):
        last_item = cta % n_items == n_items - 1
        st[2, cta] = torch.tensor([2000 + cta, 3000, 4000, 5000, 6000, 7000, 20000,
                                   20000 + (slot_tail_ns if last_item else other_tail_ns)])
    return st


def test_output_tail_splits_slot_writers_from_the_others():
    st = _stamps(n_items=4, heads=3, slot_tail_ns=1600, other_tail_ns=450)
    tail = output_tail(st, [False, False, False, True])
    assert tail["walk done -> end, slot writers"] == 1.6
    assert tail["walk done -> end, others"] == 0.45
    assert tail["last CTA"]["writes slot"] is True
    # the last CTA's stamps, us from the first state CTA's start (1000 ns)
    assert tail["last CTA"]["stamps_us"][6] == 19.0 and tail["last CTA"]["stamps_us"][7] == 20.6


def test_output_tail_when_others_end_last():
    tail = output_tail(_stamps(n_items=2, heads=2, slot_tail_ns=100, other_tail_ns=900), [False, True])
    assert tail["last CTA"]["writes slot"] is False
    assert tail["walk done -> end, slot writers"] == 0.1


def test_summarize_counts_the_ctas_that_ran():
    st = _stamps(n_items=4, heads=3, slot_tail_ns=1600, other_tail_ns=450)
    s = summarize(st)
    assert s["state pass"]["ctas"] == 4 and s["output pass"]["ctas"] == 12
    assert s["output pass"]["stamps_us"][7][2] == 20.6  # the max end


def test_output_tail_of_no_output_ctas_is_empty():
    assert output_tail(torch.zeros(3, 4096, 8, dtype=torch.long), [True]) == {}


def test_walk_clock_is_cycles_over_ns_of_whole_walks():
    st = torch.zeros(3, 4096, 8, dtype=torch.long)
    clk = torch.zeros(2, 4096, 2, 8, 12, dtype=torch.int)
    items_out = [(0, 512, 0, -1), (512, 100, 1, 0)]  # 8 chunks, then 2
    for cta, chunks in ((0, 8), (1, 2), (2, 8), (3, 2)):
        st[2, cta, 5], st[2, cta, 6] = 10_000, 10_000 + 1000 * chunks  # 1 us a chunk
        clk[1, cta, 0, 0, 1] = 500
        clk[1, cta, 0, chunks - 1, 11] = 500 + 1700 * chunks  # 1 700 cycles a chunk: 1 700 MHz
    res = walk_clock(st, clk, {"state pass": [], "output pass": items_out})
    assert res["output pass"] == {"ctas": 4, "MHz": 1700.0}
    assert res["state pass"] == {"ctas": 0, "MHz": None}
    # a block longer than the clocked chunks gives no figure
    assert walk_clock(st, clk, {"output pass": [(0, 4096, 0, 0)]})["output pass"]["ctas"] == 0


def test_warpgroup_lag_is_signed_and_per_phase():
    clk = torch.zeros(2, 4096, 2, 8, 12, dtype=torch.int)
    for cta in range(3):
        for c in range(8):
            t0 = 10_000 + 3000 * c
            clk[1, cta, 0, c, 0], clk[1, cta, 0, c, 4] = t0, t0 + 500
            clk[1, cta, 1, c, 0], clk[1, cta, 1, c, 4] = t0 + 1500, t0 + 400  # behind at the top, ahead at point 4
    lag = warpgroup_lag(clk)
    assert lag == {"loop top": 1500.0, "S packed, scores + inter issued": -100.0}
    assert warpgroup_lag(torch.zeros(2, 4096, 2, 8, 12, dtype=torch.int)) == {}
