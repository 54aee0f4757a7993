"""Bit allocation under a budget: a multiple-choice knapsack.

Each free layer g takes exactly one option j (a bit-width) with cost c[g][j] (its measured sensitivity) and weight
w[g][j] (its share of the budget, an integer: ptqkit.quant.size.layer_cost); the sum of the weights must stay
within the capacity, and the sum of the costs is minimised. `solve_exact` states it as a 0/1 integer program and
solves it with `scipy.optimize.milp` (HiGHS branch and bound, relative gap 0); `solve_greedy` is the ablation's
baseline. The summed cost assumes the layers' errors add up, which is the usual approximation of HAWQ and
its successors.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ptqkit.errors import UserError


class InfeasibleBudget(UserError):
    """Even the lightest option of every layer exceeds the capacity."""

    def __init__(self, least: int, capacity: int, message: str | None = None):
        self.least, self.capacity = least, capacity
        super().__init__(message or f"budget infeasible: the lightest choice needs {least}, the capacity is {capacity}")


def _check(costs, weights) -> None:
    if len(costs) != len(weights) or any(len(c) != len(w) or not c for c, w in zip(costs, weights)):
        raise ValueError("costs and weights: one non-empty list of options per layer, the same shapes")


def solve_exact(costs: list[list[float]], weights: list[list[int]], capacity: int) -> list[int]:
    """The option of each layer minimising the summed cost with the summed weight <= capacity (exact)."""
    _check(costs, weights)
    if not costs:
        return []
    least = sum(min(w) for w in weights)
    if least > capacity:
        raise InfeasibleBudget(least, capacity)
    sizes = [len(c) for c in costs]
    starts = np.cumsum([0] + sizes[:-1])
    n = sum(sizes)
    # Each layer's cheapest option subtracted (one option is taken per layer: the optimum does not move), then
    # scaled to a largest cost of 1000, away from the solver's absolute tolerances.
    c = np.concatenate([np.asarray(ci, dtype=np.float64) - min(ci) for ci in costs])
    scale = float(np.abs(c).max()) or 1.0
    c = c * (1000.0 / scale)
    w = np.concatenate([np.asarray(wi, dtype=np.float64) for wi in weights])
    one = np.zeros((len(costs), n))
    for g, (s, k) in enumerate(zip(starts, sizes)):
        one[g, s:s + k] = 1.0
    limit = float(capacity)
    for _ in range(8):
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one, 1, 1), LinearConstraint(w[None, :], -np.inf, limit)],
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise InfeasibleBudget(least, capacity)
        x = np.rint(res.x)
        choice = [int(np.argmax(x[s:s + k])) for s, k in zip(starts, sizes)]
        used = sum(int(weights[g][j]) for g, j in enumerate(choice))
        if used <= capacity:      # checked in integers: the solver's tolerances cannot let a violation through
            return choice
        limit -= used - capacity  # tighten by the violation and solve again
    raise InfeasibleBudget(least, capacity, "budget: the MILP solver returned no solution within the capacity")


def solve_greedy(costs: list[list[float]], weights: list[list[int]], capacity: int) -> list[int]:
    """From each layer's lightest option, repeatedly move the layer whose current cost per unit of added weight
    (for a bit budget: error per parameter and bit) is largest to its next heavier option, while the budget allows;
    a layer whose next step does not fit is passed over. Stops when no layer can move."""
    _check(costs, weights)
    orders = [sorted(range(len(w)), key=lambda j, w=w: (w[j], j)) for w in weights]
    pos = [0] * len(costs)
    least = sum(weights[g][o[0]] for g, o in enumerate(orders))
    if least > capacity:
        raise InfeasibleBudget(least, capacity)
    used = least
    blocked: set[int] = set()
    while True:
        best, best_score = None, -np.inf
        for g, order in enumerate(orders):
            if g in blocked or pos[g] + 1 >= len(order):
                continue
            j, k = order[pos[g]], order[pos[g] + 1]
            added = weights[g][k] - weights[g][j]
            score = costs[g][j] / added if added > 0 else np.inf
            if score > best_score:
                best, best_score = g, score
        if best is None:
            return [order[p] for order, p in zip(orders, pos)]
        j, k = orders[best][pos[best]], orders[best][pos[best] + 1]
        added = weights[best][k] - weights[best][j]
        if used + added > capacity:
            blocked.add(best)
            continue
        used += added
        pos[best] += 1


SOLVERS = {"exact": solve_exact, "greedy": solve_greedy}
