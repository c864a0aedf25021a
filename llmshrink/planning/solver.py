"""Choose compression decisions that meet a saving target while raising the measured loss least.

The problem is a multiple-choice knapsack in covering form: groups of options, at most one option per group
(leaving a group untouched is always allowed: saving 0, cost 0), total saving >= `need`, least total cost.

- Exact (`method="dp"`): a dynamic programme over the groups whose states are the reachable saving sums, in
  units of the savings' GCD and capped at the need, each holding its best partial plan. After each group, a
  state is dropped when one with a larger sum costs strictly less (it cannot lead to a better plan). The work
  (state x option updates) is at most groups x (need / GCD + 1) x options, and usually far less, since
  equal-sized blocks reach few distinct sums; the DP gives up once its work passes `exact_limit`.
- Otherwise (`method="greedy"`): the greedy that solves the LP relaxation. Each group starts at its cheapest
  option; then the steps along each group's lower convex hull of (saving, cost) are taken, least cost per
  saved unit first, until the need is met. All but the last step cost at most the LP optimum, so the plan
  costs at most the optimum plus that last step's cost. A repair step then makes the best change of one or
  two groups (a downgrade, a removal, a swap to another option, an exchange between groups) that still meets
  the need and lowers (cost, saving, decisions), until none does; it never raises the cost.

Costs are compared exactly (floats as integers over a common power-of-two denominator), so ties are real ties:
they go to the smaller total saving, then fewer decisions, then the decisions' (group, option) names in
order. A plan is thus the same whatever order the options come in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

from llmshrink.errors import LlmshrinkError

DEFAULT_EXACT_LIMIT = 200_000  # DP state x option updates: about 0.2 s of Python


@dataclass(frozen=True)
class Option:
    """One decision of a group: `saving` units saved (params, bytes or MACs), `cost` its measured loss
    increase (taken alone, on calibration data)."""

    group: str
    name: str
    saving: int
    cost: float


@dataclass(frozen=True)
class Plan:
    """The chosen option per group (groups left untouched are absent), in group-name order; `method` is "dp",
    "greedy", or "none" (nothing was needed)."""

    chosen: dict[str, Option] = field(default_factory=dict)
    saving: int = 0
    cost: float = 0.0
    method: str = "none"


def _units(count: int) -> str:
    return f"{count:,} units"


def solve(options: Iterable[Option], need: int, *, exact_limit: int = DEFAULT_EXACT_LIMIT,
          describe: Callable[[int], str] = _units, field_name: str = "target") -> Plan:
    """At most one option per group, total saving >= `need`, least total cost (see the module docstring).

    `need <= 0` gives the empty plan. An unreachable need raises LlmshrinkError in one line,
    "{field_name}: needs {describe(need)} saved, the search space saves at most {describe(most)}".
    """
    groups = _groups(options)
    if need <= 0:
        return Plan()
    most = sum(max(option.saving for option in opts) for opts in groups.values())
    if most < need:
        raise LlmshrinkError(f"{field_name}: needs {describe(need)} saved, the search space saves at most "
                             f"{describe(most)}")
    names = sorted(groups)
    # Rank 0 is "untouched"; the options of a group follow by name.
    table = [[None, *sorted(groups[name], key=lambda o: o.name)] for name in names]
    denominator = math.lcm(*(Fraction(o.cost).denominator for opts in groups.values() for o in opts))
    costs = [[0] + [int(Fraction(o.cost) * denominator) for o in row[1:]] for row in table]
    savings = [[0] + [o.saving for o in row[1:]] for row in table]
    ranks = _dp(savings, costs, need, exact_limit)
    method = "dp"
    if ranks is None:
        ranks, method = _greedy(savings, costs, need), "greedy"
    chosen = {name: row[rank] for name, row, rank in zip(names, table, ranks, strict=True) if rank}
    total = sum(cost[rank] for cost, rank in zip(costs, ranks, strict=True))
    return Plan(chosen, sum(o.saving for o in chosen.values()), total / denominator, method)


def _groups(options: Iterable[Option]) -> dict[str, list[Option]]:
    groups: dict[str, list[Option]] = {}
    for option in options:
        if isinstance(option.saving, bool) or not isinstance(option.saving, int) or option.saving < 0:
            raise ValueError(f"{option}: saving must be an int >= 0")
        if not math.isfinite(option.cost):
            raise ValueError(f"{option}: cost must be finite")
        if any(other.name == option.name for other in groups.get(option.group, [])):
            raise ValueError(f"{option}: two options named {option.name!r} in group {option.group!r}")
        groups.setdefault(option.group, []).append(option)
    return groups


def _dp(savings: list[list[int]], costs: list[list[int]], need: int, limit: int) -> list[int] | None:
    """Ranks of the exact optimum (with the tie-breaks), or None once the work passes `limit`."""
    step = math.gcd(*(s for row in savings for s in row)) or 1
    cap = -(-need // step)
    units = [[s // step for s in row] for row in savings]
    # state (capped sum) -> (cost, saving, decisions, chain); chain: (rank, earlier chain) per group so far
    states: dict[int, tuple[int, int, int, tuple | None]] = {0: (0, 0, 0, None)}
    work = 0
    for row_units, row_costs in zip(units, costs, strict=True):
        work += len(states) * len(row_units)
        if work > limit:
            return None
        new: dict[int, tuple[int, int, int, tuple | None]] = {}
        for state, (cost, saving, count, chain) in states.items():
            for rank, (unit, extra) in enumerate(zip(row_units, row_costs, strict=True)):
                reached = min(state + unit, cap)
                candidate = (cost + extra, saving + unit, count + (rank > 0), (rank, chain))
                best = new.get(reached)
                if best is None or _before(candidate, best):
                    new[reached] = candidate
        states, cheapest = {}, None
        for state in sorted(new, reverse=True):  # drop a state that a larger sum beats on cost
            if cheapest is None or new[state][0] <= cheapest:
                states[state] = new[state]
                cheapest = new[state][0]
    chain = states[cap][3]
    ranks = []
    while chain is not None:
        rank, chain = chain
        ranks.append(rank)
    return ranks[::-1]


def _before(a: tuple, b: tuple) -> bool:
    if a[:3] != b[:3]:
        return a[:3] < b[:3]
    return _ranks(a[3]) < _ranks(b[3])


def _ranks(chain: tuple | None) -> list[tuple[int, int]]:
    """(group, rank) of the decisions taken, in group order."""
    out = []
    while chain is not None:
        rank, chain = chain
        out.append(rank)
    return [(g, rank) for g, rank in enumerate(reversed(out)) if rank]


def _greedy(savings: list[list[int]], costs: list[list[int]], need: int) -> list[int]:
    """LP greedy over each group's convex-hull upgrades, then the repair step."""
    ranks, upgrades = [], []
    for g, (row_savings, row_costs) in enumerate(zip(savings, costs, strict=True)):
        points = sorted(range(len(row_savings)), key=lambda r: (row_savings[r], row_costs[r], r))
        start = min(points, key=lambda r: (row_costs[r], row_savings[r], r))
        hull = [start]
        for r in points:  # by saving, then cost: the lower convex hull to the right of the start
            if row_savings[r] <= row_savings[hull[-1]]:
                continue  # the start's saving or less, or a hull point's saving at no less cost
            while len(hull) >= 2 and (_slope(row_savings, row_costs, hull[-2], hull[-1])
                                      > _slope(row_savings, row_costs, hull[-1], r)):
                hull.pop()
            hull.append(r)
        ranks.append(start)
        upgrades += [(_slope(row_savings, row_costs, hull[i], hull[i + 1]), g, i, hull[i + 1])
                     for i in range(len(hull) - 1)]
    total = sum(row[r] for row, r in zip(savings, ranks, strict=True))
    for _, g, _, r in sorted(upgrades):
        if total >= need:
            break
        total += savings[g][r] - savings[g][ranks[g]]
        ranks[g] = r
    return _repair(savings, costs, need, ranks)


def _slope(savings: list[int], costs: list[int], a: int, b: int) -> Fraction:
    return Fraction(costs[b] - costs[a], savings[b] - savings[a])


def _repair(savings: list[list[int]], costs: list[list[int]], need: int, ranks: list[int]) -> list[int]:
    """Repeatedly make the change of one or two groups that still meets the need and lowers (cost, saving,
    decisions) most, until none does. It never raises the cost, so the greedy's bound holds."""
    total = sum(row[r] for row, r in zip(savings, ranks, strict=True))
    while True:
        # (cost change, saving change, decisions change, group, rank) of every one-group change
        moves = [(costs[g][r] - costs[g][now], savings[g][r] - savings[g][now], (r > 0) - (now > 0), g, r)
                 for g, now in enumerate(ranks) for r in range(len(savings[g])) if r != now]
        best = min(((*m[:3], (m[3:],)) for m in moves if m[:3] < (0, 0, 0) and total + m[1] >= need),
                   default=None)
        for first in moves:
            if first[0] > 0:  # a two-group change that does not raise the cost has a part that does not
                continue
            for second in moves:
                if second[3] == first[3] or first[0] + second[0] > 0 or total + first[1] + second[1] < need:
                    continue
                key = (first[0] + second[0], first[1] + second[1], first[2] + second[2],
                       (first[3:], second[3:]))
                if key[:3] < (0, 0, 0) and (best is None or key < best):
                    best = key
        if best is None:
            return ranks
        total += best[1]
        for g, r in best[3]:
            ranks[g] = r
