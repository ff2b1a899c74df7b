"""The bit allocator (ember/quant/allocate.py) against brute force over every combination."""
import itertools
import random

import pytest

from ember.errors import ConfigError
from ember.quant.allocate import allocate, total


def brute_force(costs, errors, budget):
    """Least error sum over all combinations within the budget (None when nothing fits)."""
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        bits, err = total(costs, errors, pick)
        if bits <= budget and (best is None or err < best):
            best = err
    return best


def random_table(rng, n_items, n_opts, scale):
    """Per item: options with random costs, error falling with cost (plus noise: not always convex)."""
    costs, errors = [], []
    for _ in range(n_items):
        c = sorted(rng.sample(range(1, 10 * scale), n_opts))
        e = [rng.uniform(0.5, 2.0) * 2.0 ** (-x / scale) for x in c]
        costs.append(c)
        errors.append(e)
    return costs, errors


@pytest.mark.parametrize("seed", range(12))
def test_exact_on_small_integer_budgets(seed):
    rng = random.Random(seed)
    costs, errors = random_table(rng, rng.randint(2, 6), rng.randint(2, 5), 4)
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in (lo, (lo + hi) // 2, rng.randint(lo, hi), hi):
        pick = allocate(costs, errors, budget)  # spare budget < max_buckets: unit 1, exact DP
        bits, err = total(costs, errors, pick)
        assert bits <= budget
        assert err == pytest.approx(brute_force(costs, errors, budget), rel=1e-12), (budget, pick)


@pytest.mark.parametrize("seed", range(6))
def test_coarse_units_stay_feasible_and_near_optimal(seed):
    """With costs far above the bucket count the DP rounds costs up; the result must fit the budget and be
    at least as good as the exact optimum of a budget smaller by the worst-case rounding."""
    rng = random.Random(100 + seed)
    n_items = 5
    costs, errors = random_table(rng, n_items, 4, 1000)
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.randint(lo, hi)
    buckets = 64
    pick = allocate(costs, errors, budget, max_buckets=buckets)
    bits, err = total(costs, errors, pick)
    assert bits <= budget
    unit = -(-(budget - lo) // buckets)
    worse = brute_force(costs, errors, budget - n_items * unit)
    assert worse is None or err <= worse + 1e-12
    assert err >= brute_force(costs, errors, budget) - 1e-12


def test_budget_below_the_cheapest_is_an_error():
    with pytest.raises(ConfigError, match="below the smallest"):
        allocate([[10, 20], [5, 8]], [[1.0, 0.5], [1.0, 0.2]], 14)


def test_many_items_use_the_budget():
    """Realistic size (120 linears x 20 options): at most 0.1% of the budget is left unused (the converter
    promises the real bpw within 0.02 of the target)."""
    rng = random.Random(7)
    costs, errors = random_table(rng, 120, 20, 5000)
    budget = (sum(min(c) for c in costs) + sum(max(c) for c in costs)) // 2
    pick = allocate(costs, errors, budget)
    bits, _ = total(costs, errors, pick)
    assert bits <= budget
    assert budget - bits <= budget * 1e-3, (budget, bits)
