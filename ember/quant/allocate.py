"""Allocate stage: one candidate per linear, minimizing the summed (weighted) error under a bit budget.

A knapsack with one choice per item: dynamic programming over a discretized budget, then a greedy fill
that spends what the rounding left over on the best remaining upgrades (exact integer costs).

Costs are counted above each linear's cheapest option, in integer units of `unit` bits (unit 1 when the
spare budget has at most `max_buckets` bits: the DP is then exact). Each option's cost is rounded up to
whole units, so the DP's choice always fits; what rounding wastes (at most one unit per linear) goes
back through the greedy fill."""
from __future__ import annotations

import math

import numpy as np

from ember.errors import ConfigError


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int,
             max_buckets: int = 1 << 15) -> list[int]:
    """costs[l][c]: bits of option c for item l; errors[l][c]: its (already weighted) error.
    Returns the chosen option per item with sum(cost) <= budget and the smallest error sum found.
    Raises ConfigError when even the cheapest options exceed the budget."""
    base = [min(c) for c in costs]
    spare = budget - sum(base)
    if spare < 0:
        raise ConfigError(f"the bit budget {budget} is below the smallest reachable {sum(base)}")
    unit = max(1, math.ceil(spare / max_buckets))
    n_units = spare // unit
    best = np.zeros(n_units + 1)  # best[b]: least error with at most b units spent so far
    choices = []
    for cost, err in zip(costs, errors):
        extra = [-(-(c - min(cost)) // unit) for c in cost]  # ceil, in units
        new = np.full(n_units + 1, np.inf)
        arg = np.zeros(n_units + 1, dtype=np.int16)
        for c, (u, e) in enumerate(zip(extra, err)):
            if u > n_units:
                continue
            cand = np.full(n_units + 1, np.inf)
            cand[u:] = best[:n_units + 1 - u] + e
            better = cand < new
            new[better], arg[better] = cand[better], c
        best = new
        choices.append(arg)
    pick, b = [0] * len(costs), n_units
    for i in range(len(costs) - 1, -1, -1):
        c = int(choices[i][b])
        pick[i] = c
        b -= -(-(costs[i][c] - base[i]) // unit)
    return greedy_fill(costs, errors, budget, pick)


def greedy_fill(costs: list[list[int]], errors: list[list[float]], budget: int, pick: list[int]) -> list[int]:
    """Upgrade items while the budget allows: each step takes the affordable change with the largest
    error decrease per extra bit (free improvements first)."""
    pick = list(pick)
    left = budget - sum(c[p] for c, p in zip(costs, pick))
    while True:
        best, best_score = None, 0.0
        for i, (cost, err) in enumerate(zip(costs, errors)):
            for c in range(len(cost)):
                d_bits, d_err = cost[c] - cost[pick[i]], err[pick[i]] - err[c]
                if d_err <= 0 or d_bits > left:
                    continue
                score = math.inf if d_bits <= 0 else d_err / d_bits
                if score > best_score or (score == best_score and best is not None and d_err > best[2]):
                    best, best_score = (i, c, d_err), score
        if best is None:
            return pick
        i, c, _ = best
        left -= costs[i][c] - costs[i][pick[i]]
        pick[i] = c


def total(costs: list[list[int]], errors: list[list[float]], pick: list[int]) -> tuple[int, float]:
    """(bits, error) of a choice."""
    return (sum(c[p] for c, p in zip(costs, pick)), sum(e[p] for e, p in zip(errors, pick)))
