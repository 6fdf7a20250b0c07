"""The solver's search as pure functions of numbers: which layers to promote to high precision,
in which order, and how many. No model and no data: ``passes(k)`` says whether the candidate with
the first ``k`` layers of the order promoted meets the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

ORDERS = ("sensitivity", "per-cost")


def best_precisions(layers: Sequence[str], precisions: Sequence[str], sensitivity: Callable[[str, str], float]) -> dict[str, str]:
    """Each layer's 8-bit precision with the smallest sweep error (8-bit formats cost the same)."""
    return {name: min(precisions, key=lambda p: sensitivity(name, p)) for name in layers}


def promotion_order(layers: Sequence[str], sensitivity: Mapping[str, float], extra_cost: Mapping[str, float] | None = None) -> list[str]:
    """Most sensitive first; with ``extra_cost`` (what promoting a layer adds), most sensitivity per
    unit of added cost first, so cheap sensitive layers go first. Ties keep the layers' order."""
    def gain(name: str) -> float:
        if extra_cost is None:
            return sensitivity[name]
        return sensitivity[name] / max(extra_cost[name], 1e-12)

    return sorted(layers, key=gain, reverse=True)


def apply_macs_floor(order: Sequence[str], matmul_macs: Mapping[str, int], always_high_macs: int, min_8bit_fraction: float) -> list[str]:
    """``order`` without the layers whose promotion would leave less than ``min_8bit_fraction`` of
    all MatMul/Gemm MACs in 8 bits, taken in order; ``always_high_macs`` are high precision in
    every candidate (split-off outlier channels, online rotations) and count against the floor."""
    total = sum(matmul_macs.values()) + always_high_macs
    budget = (1 - min_8bit_fraction) * total - always_high_macs
    kept = []
    for name in order:
        if matmul_macs[name] <= budget:
            budget -= matmul_macs[name]
            kept.append(name)
    return kept


def initial_count(order: Sequence[str], sensitivity: Mapping[str, float], target_cosine: float) -> int:
    """The smallest count whose summed noise-to-signal ratio of the layers left in 8 bits stays
    within the target cosine's, 1/c² − 1 (independent noises add): where the search starts."""
    budget = 1 / target_cosine**2 - 1
    remaining = sum(sensitivity[name] for name in order)
    count = 0
    while count < len(order) and remaining > budget:
        remaining -= sensitivity[order[count]]
        count += 1
    return count


def smallest_passing_count(passes: Callable[[int], bool], n: int, start: int = 0) -> int | None:
    """The smallest count in [0, n] that passes, None when even ``n`` fails.

    Accuracy is taken as monotone in the count. 0 (the all-8-bit baseline) is always tried first;
    then ``start``; then counts above the largest failing one, in doubling steps, until one passes;
    then bisection between the largest failing and the smallest passing count.
    """
    if passes(0):
        return 0
    if 0 < start <= n and passes(start):
        return _bisect(passes, 0, start)
    failing, step = min(start, n), 1
    while failing < n:
        k = min(n, failing + step)
        if passes(k):
            return _bisect(passes, failing, k)
        failing, step = k, step * 2
    return None


def _bisect(passes: Callable[[int], bool], failing: int, passing: int) -> int:
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if passes(mid):
            passing = mid
        else:
            failing = mid
    return passing


def cheapest_meeting(candidates: Sequence[Mapping], met: Callable[[float], bool], score: Callable[[float], float]) -> Mapping | None:
    """The cheapest candidate whose ``accuracy`` meets the target (the higher ``score`` on equal
    cost), None when none does. No candidate dominates it: one at least as accurate also meets
    the target, so it costs more, or the same with no better score."""
    meeting = [c for c in candidates if met(c["accuracy"])]
    return min(meeting, key=lambda c: (c["cost"], -score(c["accuracy"])), default=None)


def undominated(chosen: Mapping, candidates: Sequence[Mapping], score: Callable[[float], float]) -> Mapping:
    """``chosen``, or when candidates cost no more and score at least as well with one of the two
    strictly better, the best-scoring of them (the cheaper on equal score)."""
    def dominates(c: Mapping) -> bool:
        cheaper_or_same, better_or_same = c["cost"] <= chosen["cost"], score(c["accuracy"]) >= score(chosen["accuracy"])
        return cheaper_or_same and better_or_same and (c["cost"] < chosen["cost"] or score(c["accuracy"]) > score(chosen["accuracy"]))

    rivals = [c for c in candidates if dominates(c)]
    return max(rivals, key=lambda c: (score(c["accuracy"]), -c["cost"])) if rivals else chosen
