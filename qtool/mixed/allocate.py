"""Choose one candidate per layer group: minimise the summed cost under a size budget.

A multiple-choice knapsack written as a 0/1 integer program and solved by scipy.optimize.milp
(HiGHS): x[u, c] = 1 when group u takes candidate c; each group takes exactly one candidate;
sum(size[u, c] * x[u, c]) <= budget; minimise sum(cost[u, c] * x[u, c]).
"""

from __future__ import annotations

import numpy as np

from qtool.errors import SpecError


def allocate(cost: np.ndarray, size: np.ndarray, budget: float) -> np.ndarray:
    """The candidate index chosen for every group.

    cost, size: arrays of shape (groups, candidates); size in the budget's unit (bits or bytes).
    Returns an int array of shape (groups,). Raises SpecError when even the smallest candidate of
    every group exceeds `budget`, or when the solver does not reach an optimum.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    groups, candidates = cost.shape
    smallest = float(size.min(axis=1).sum())
    if smallest > budget * (1 + 1e-12):
        raise SpecError(f"budget below the smallest plan ({smallest:.6g} > {budget:.6g})")
    one_each = np.kron(np.eye(groups), np.ones(candidates))
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(size.reshape(1, -1), -np.inf, budget)]
    # costs are scaled to O(1) so that HiGHS' absolute tolerances mean the same for every model
    scale = float(np.abs(cost).max()) or 1.0
    result = milp(cost.reshape(-1) / scale, constraints=constraints, integrality=np.ones(cost.size),
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-6})
    if result.x is None:
        raise SpecError(f"the bit allocation found no plan under the budget ({result.message})")
    return np.asarray(result.x).reshape(groups, candidates).argmax(axis=1)
