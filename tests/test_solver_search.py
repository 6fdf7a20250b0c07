"""The solver's search on numbers alone: no model, no data."""

import pytest

from onnxq.mixed_precision.search import (
    apply_macs_floor,
    best_precisions,
    initial_count,
    promotion_order,
    smallest_passing_count,
)


class Monotone:
    """passes(k) for k >= threshold; records every count asked, in order."""

    def __init__(self, threshold: int | None):
        self.threshold = threshold
        self.asked: list[int] = []

    def __call__(self, k: int) -> bool:
        self.asked.append(k)
        return self.threshold is not None and k >= self.threshold


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("start_offset", [None, -3, 0, 4])
def test_finds_the_smallest_passing_count(n, start_offset):
    for threshold in range(n + 1):
        start = 0 if start_offset is None else min(n, max(0, threshold + start_offset))
        passes = Monotone(threshold)
        assert smallest_passing_count(passes, n, start) == threshold
        assert passes.asked[0] == 0  # the all-8-bit baseline first: the curve's first point
        assert len(passes.asked) == len(set(passes.asked))  # no count evaluated twice
        assert all(0 <= k <= n for k in passes.asked)


def test_search_is_logarithmic_in_the_number_of_layers():
    passes = Monotone(700)
    assert smallest_passing_count(passes, 1000) == 700
    assert len(passes.asked) <= 2 * 10 + 2


def test_reports_failure_when_even_all_layers_fail():
    for n, start in [(0, 0), (1, 0), (9, 0), (9, 5), (9, 9)]:
        passes = Monotone(None)
        assert smallest_passing_count(passes, n, start) is None
        assert passes.asked[0] == 0 and passes.asked[-1] == n  # n itself was tried


def test_a_passing_start_bisects_below_it():
    passes = Monotone(3)
    assert smallest_passing_count(passes, 100, start=40) == 3
    assert passes.asked[:2] == [0, 40] and max(passes.asked) == 40


def test_initial_count_keeps_the_summed_noise_within_the_cosine_budget():
    sens = {"a": 0.05, "b": 0.02, "c": 0.01, "d": 0.001}
    order = ["a", "b", "c", "d"]
    for cosine in (0.9, 0.97, 0.99, 0.999, 1.0):
        k = initial_count(order, sens, cosine)
        budget = 1 / cosine**2 - 1
        assert sum(sens[x] for x in order[k:]) <= budget or k == len(order)
        assert k == 0 or sum(sens[x] for x in order[k - 1 :]) > budget  # the smallest such count


def test_promotion_order_by_sensitivity_and_per_cost():
    sens = {"big": 0.10, "small": 0.04, "tiny": 0.001}
    assert promotion_order(list(sens), sens) == ["big", "small", "tiny"]
    extra = {"big": 100.0, "small": 1.0, "tiny": 0.001}  # cost each promotion adds
    per_cost = promotion_order(list(sens), sens, extra)
    ratios = [sens[n] / extra[n] for n in per_cost]
    assert ratios == sorted(ratios, reverse=True) and per_cost[-1] == "big"
    tied = {"x": 1.0, "y": 1.0, "z": 2.0}
    assert promotion_order(["x", "y", "z"], tied) == ["z", "x", "y"]  # ties keep the layers' order


def test_min_8bit_macs_floor_skips_layers_that_would_break_it():
    macs = {"head": 60, "q": 20, "k": 10, "v": 10}  # 100 MatMul MACs
    order = ["head", "q", "k", "v"]
    # at most 40 of 100 MACs may leave 8 bits: the head (60) never goes, the rest fit in order
    assert apply_macs_floor(order, macs, 0, 0.6) == ["q", "k", "v"]
    assert apply_macs_floor(order, macs, 0, 0.75) == ["q"]  # 25 may go: q (20), then k no longer fits
    assert apply_macs_floor(order, macs, 0, 0.0) == order
    assert apply_macs_floor(order, macs, 0, 1.0) == []
    # 25 MACs high precision in every candidate (split-off channels): 0.4 x 125 - 25 = 25 left
    assert apply_macs_floor(order, macs, 25, 0.6) == ["q"]
    assert apply_macs_floor(["k", "q", "v"], macs, 25, 0.6) == ["k", "v"]  # the order decides who goes

def test_best_precision_is_the_least_sensitive_one():
    table = {("a", "int8"): 0.1, ("a", "fp8"): 0.2, ("b", "int8"): 0.3, ("b", "fp8"): 0.05}
    assert best_precisions(["a", "b"], ["int8", "fp8"], lambda layer, p: table[layer, p]) == {"a": "int8", "b": "fp8"}
