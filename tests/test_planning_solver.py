"""llmshrink.planning.solver against brute force: the DP's plan is the brute-force optimum (tie-breaks included),
the greedy meets the need and stays within its stated bound (exact where costs per unit are convex), hand-made
plans by name, one-line refusals, and a parameter-count-sized instance in well under a second."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from llmshrink.errors import LlmshrinkError
from llmshrink.planning import Option, Plan, solve


def brute_force(options: list[Option], need: int) -> Plan:
    """Every combination; least (exact cost, saving, decisions, the decisions' (group, option) names in order),
    as the solver's docstring states."""
    if need <= 0:
        return Plan()
    groups: dict[str, list[Option]] = {}
    for option in options:
        groups.setdefault(option.group, []).append(option)
    rows = [[None, *sorted(groups[name], key=lambda o: o.name)] for name in sorted(groups)]
    best = None
    for ranks in itertools.product(*(range(len(row)) for row in rows)):
        picked = [row[r] for row, r in zip(rows, ranks, strict=True) if r]
        saving = sum(o.saving for o in picked)
        if saving < need:
            continue
        taken = tuple((g, r) for g, r in enumerate(ranks) if r)
        key = (sum((Fraction(o.cost) for o in picked), Fraction(0)), saving, len(picked), taken)
        if best is None or key < best[0]:
            best = (key, picked)
    assert best is not None, "infeasible"
    (cost, saving, _, _), picked = best
    return Plan({o.group: o for o in picked}, saving, float(cost), "brute")


def exact_cost(plan: Plan) -> Fraction:
    return sum((Fraction(o.cost) for o in plan.chosen.values()), Fraction(0))


def check_valid(plan: Plan, options: list[Option], need: int) -> None:
    assert all(plan.chosen[group] in options and group == o.group for group, o in plan.chosen.items())
    assert plan.saving == sum(o.saving for o in plan.chosen.values()) >= need
    assert plan.cost == float(exact_cost(plan))


def random_instance(rng: random.Random) -> list[Option]:
    options = []
    for g in range(rng.randint(2, 5)):
        for k in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.3:  # from a small pool: equal costs, exact ties
                cost = rng.choice([0.0, 0.25, 0.5, 1.0])
            elif roll < 0.4:
                cost = -rng.uniform(0, 0.3)  # calibration noise
            else:
                cost = rng.uniform(0, 2)
            options.append(Option(f"g{g}", f"o{k}", rng.randint(1, 40), cost))
    rng.shuffle(options)
    return options


def needs(rng: random.Random, options: list[Option]) -> list[int]:
    most = sum(max(o.saving for o in options if o.group == g) for g in {o.group for o in options})
    return [0, 1, most, *(rng.randint(1, most) for _ in range(4))]


def test_dp_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    checked = 0
    for _ in range(200):
        options = random_instance(rng)
        for need in needs(rng, options):
            plan, best = solve(options, need), brute_force(options, need)
            assert plan.method == ("dp" if need > 0 else "none")
            check_valid(plan, options, need)
            # the same plan, not just the same cost: the tie-breaks are the brute force's order
            assert (plan.chosen, plan.saving, plan.cost) == (best.chosen, best.saving, best.cost), (options, need)
            # and whatever order the options come in
            assert solve(list(reversed(options)), need).chosen == plan.chosen
            checked += 1
    assert checked == 1400


def test_dp_gives_up_past_its_limit():
    options = [Option(f"g{g}", "x", 10 + g, 1.0) for g in range(6)]
    assert solve(options, 30).method == "dp"
    assert solve(options, 30, exact_limit=10).method == "greedy"  # the 3rd group alone takes 2 x 2 x 2 updates


def test_greedy_meets_need_within_bound():
    """The LP greedy's plan before its last upgrade costs at most the LP optimum <= the optimum, and the repair
    never raises the cost: greedy <= optimum + the dearest hull step <= optimum + max over groups of (dearest
    - cheapest option, untouched included). Asserted on every instance; equality is not (it can fail)."""
    rng = random.Random(1)
    optimal = total = 0
    for _ in range(200):
        options = random_instance(rng)
        spread = max(max(max(o.cost for o in group), 0.0) - min(min(o.cost for o in group), 0.0)
                     for group in ([o for o in options if o.group == g] for g in {o.group for o in options}))
        for need in needs(rng, options):
            plan, best = solve(options, need, exact_limit=0), brute_force(options, need)
            assert plan.method == ("greedy" if need > 0 else "none")
            check_valid(plan, options, need)
            assert exact_cost(best) <= exact_cost(plan) <= exact_cost(best) + Fraction(spread), (options, need)
            assert solve(list(reversed(options)), need, exact_limit=0).chosen == plan.chosen
            optimal += exact_cost(plan) == exact_cost(best)
            total += 1
    print(f"greedy optimal on {optimal} of {total}")


def test_greedy_is_exact_when_cost_per_unit_is_convex():
    """Every option saves a multiple of one step u, option k saves k*u, and its cost rises by non-decreasing
    increments (dyadic, so sums are exact): each group's hull steps are all u, the LP greedy reaches
    ceil(need / u) * u exactly, its LP solution is whole, so it is optimal."""
    rng = random.Random(2)
    for _ in range(200):
        unit = rng.randint(1, 10)
        options = []
        for g in range(rng.randint(2, 5)):
            increments = sorted(rng.randint(-16, 64) / 32 for _ in range(rng.randint(1, 4)))
            costs = list(itertools.accumulate(increments))
            options += [Option(f"g{g}", f"keep {rng.random():.6f}", (k + 1) * unit, cost)
                        for k, cost in enumerate(costs)]
        rng.shuffle(options)
        most = sum(max(o.saving for o in options if o.group == g) for g in {o.group for o in options})
        for need in [0, most, *(rng.randint(1, most) for _ in range(8))]:
            plan = solve(options, need, exact_limit=0)
            check_valid(plan, options, need)
            assert exact_cost(plan) == exact_cost(brute_force(options, need)), (options, need)


SPACE = [
    Option("block 3 FFN", "keep 0.75", 25, 0.10),
    Option("block 3 FFN", "keep 0.5", 50, 0.30),
    Option("block 3 FFN", "keep 0.25", 75, 0.90),
    Option("block 5", "drop", 100, 0.55),
    Option("layer x", "nf4", 60, 0.20),
    Option("layer x", "int8", 40, 0.05),
]


def names(plan: Plan) -> dict[str, str]:
    return {group: option.name for group, option in plan.chosen.items()}


@pytest.mark.parametrize("limit", [None, 0])
@pytest.mark.parametrize(("need", "expected"), [
    (1, {"layer x": "int8"}),  # 0.05
    (40, {"layer x": "int8"}),
    (60, {"block 3 FFN": "keep 0.75", "layer x": "int8"}),  # 0.15 < nf4's 0.20
    (90, {"block 3 FFN": "keep 0.5", "layer x": "int8"}),  # 0.35
    (100, {"block 3 FFN": "keep 0.5", "layer x": "nf4"}),  # 0.50 < drop's 0.55
    (140, {"block 5": "drop", "layer x": "int8"}),  # 0.60
    (200, {"block 3 FFN": "keep 0.5", "block 5": "drop", "layer x": "nf4"}),  # 1.05
    (235, {"block 3 FFN": "keep 0.25", "block 5": "drop", "layer x": "nf4"}),  # everything: 1.65
])
def test_hand_made_plans(need, expected, limit):
    plan = solve(SPACE, need) if limit is None else solve(SPACE, need, exact_limit=limit)
    if limit == 0 and need == 100:
        # The greedy's one miss here: it takes int8, keep 0.75 and drop (0.70, by cost per unit), the repair
        # removes the two no longer needed (0.55); the optimum is three changes away. Within its bound.
        expected = {"block 5": "drop"}
    assert names(plan) == expected
    assert plan.method == ("dp" if limit is None else "greedy")
    assert list(plan.chosen) == sorted(plan.chosen)  # group-name order


@pytest.mark.parametrize("limit", [None, 0])
def test_ties_are_deterministic(limit):
    kwargs = {} if limit is None else {"exact_limit": limit}
    same = [Option("b", "x", 10, 1.0), Option("a", "x", 10, 1.0), Option("a", "w", 10, 1.0)]
    for order in itertools.permutations(same):
        assert names(solve(list(order), 10, **kwargs)) == {"a": "w"}  # first group, then first name
    # equal cost: the smaller saving
    assert names(solve([Option("a", "big", 30, 1.0), Option("b", "small", 10, 1.0)], 10, **kwargs)) == {"b": "small"}
    # equal cost and saving: fewer decisions
    split = [Option("a", "half", 10, 0.5), Option("b", "half", 10, 0.5), Option("c", "one", 20, 1.0)]
    # (the greedy takes the halves by cost per unit, then group order; the exchange is three changes away)
    assert names(solve(split, 20, **kwargs)) == ({"c": "one"} if limit is None else {"a": "half", "b": "half"})
    for case, need in ((same, 10), (split, 20)):
        plans = {tuple(solve(list(order), need, **kwargs).chosen.items()) for order in itertools.permutations(case)}
        assert len(plans) == 1
    # costs are compared exactly: 0.1 + 0.2 is above 0.3 as floats go, so this is no tie
    exact = [Option("a", "x", 10, 0.1), Option("b", "y", 10, 0.2), Option("a", "z", 20, 0.3)]
    assert names(solve(exact, 20, **kwargs)) == {"a": "z"}
    exact[2] = Option("a", "z", 20, 0.30000000000000004)  # the float sum 0.1 + 0.2, but the exact sum is below it
    assert names(solve(exact, 20, **kwargs)) == {"a": "x", "b": "y"}


def test_greedy_repair():
    # The LP greedy takes a (0.1 per unit), then b (0.2 per unit) to reach 10; the repair exchanges b for c.
    options = [Option("a", "x", 9, 0.9), Option("b", "y", 10, 2.0), Option("c", "z", 1, 0.5)]
    assert names(solve(options, 10, exact_limit=0)) == {"a": "x", "c": "z"}
    # No c: a is no longer needed once b is in.
    assert names(solve(options[:2], 10, exact_limit=0)) == {"b": "y"}


def test_negative_costs():
    options = [Option("a", "noise", 5, -0.1), Option("b", "x", 10, 1.0)]
    for limit in (None, 0):
        kwargs = {} if limit is None else {"exact_limit": limit}
        assert names(solve(options, 1, **kwargs)) == {"a": "noise"}
        assert names(solve(options, 6, **kwargs)) == {"a": "noise", "b": "x"}  # 0.9 < 1.0
        assert solve(options, 0, **kwargs) == Plan()  # nothing needed: nothing changes, noise or not


def test_nothing_needed():
    for need in (0, -5):
        plan = solve(SPACE, need)
        assert plan == Plan() and (plan.chosen, plan.saving, plan.cost, plan.method) == ({}, 0, 0.0, "none")


def test_infeasible_refused_in_one_line():
    with pytest.raises(LlmshrinkError) as err:
        solve(SPACE, 236)
    assert str(err.value) == "target: needs 236 units saved, the search space saves at most 235 units"
    with pytest.raises(LlmshrinkError) as err:
        solve([Option("h.0", "drop", 1_000_000, 0.1)], 1_200_000, describe=lambda n: f"{n:,} params",
              field_name="target.params")
    assert str(err.value) == ("target.params: needs 1,200,000 params saved, the search space saves at most "
                              "1,000,000 params")
    with pytest.raises(LlmshrinkError, match="^target: needs 1 units saved, the search space saves at most 0 units$"):
        solve([], 1)


def test_bad_options():
    with pytest.raises(ValueError, match="saving must be an int >= 0"):
        solve([Option("a", "x", -1, 0.0)], 1)
    with pytest.raises(ValueError, match="saving must be an int >= 0"):
        solve([Option("a", "x", 1.5, 0.0)], 1)
    with pytest.raises(ValueError, match="cost must be finite"):
        solve([Option("a", "x", 1, float("nan"))], 1)
    with pytest.raises(ValueError, match="two options named 'x' in group 'a'"):
        solve([Option("a", "x", 1, 0.0), Option("a", "x", 2, 0.0)], 1)


def large_instance(rng: random.Random, regular: bool) -> list[Option]:
    """30 blocks x 4 options with parameter counts: FFN keep 0.75 / 0.5 / 0.25 or drop the block; regular: all
    blocks the same size, costs rising with the share removed; else random sizes and unrelated costs."""
    options = []
    for block in range(30):
        if regular:
            ffn, whole = 2_359_296, 3_145_728
            costs = [rng.uniform(0, 0.05) * share for share in (1, 2, 3)] + [rng.uniform(0.05, 0.5)]
        else:
            ffn = rng.randint(200_000, 900_000)
            whole = ffn + rng.randint(100_000, 400_000)
            costs = [rng.uniform(-0.01, 1) for _ in range(4)]
        savings = [ffn // 4, ffn // 2, 3 * ffn // 4, whole]
        for name, saving, cost in zip(("keep 0.75", "keep 0.5", "keep 0.25", "drop"), savings, costs, strict=True):
            options.append(Option(f"block {block}", name, saving, cost))
    return options


@pytest.mark.parametrize("regular", [False, True])
def test_large_instance_is_solved_exactly_within_the_work_limit(regular):
    rng = random.Random(3)
    options = large_instance(rng, regular)
    most = sum(max(o.saving for o in options if o.group == f"block {b}") for b in range(30))
    spread = max(max(max(o.cost for o in options if o.group == f"block {b}"), 0.0)
                 - min(min(o.cost for o in options if o.group == f"block {b}"), 0.0) for b in range(30))
    for fraction in (0.1, 0.3, 0.6, 0.9):
        need = int(fraction * most)
        plans = {}
        for limit in (None, 0):
            plan = solve(options, need) if limit is None else solve(options, need, exact_limit=limit)
            check_valid(plan, options, need)
            plans[limit] = plan
        assert plans[0].method == "greedy"
        # Within the default limit the DP's pruning (a smaller sum that costs more is dropped) keeps few states.
        assert plans[None].method == "dp"
        assert exact_cost(plans[None]) <= exact_cost(plans[0]) <= exact_cost(plans[None]) + Fraction(spread)


def test_many_groups_fall_back_to_greedy():
    """300 groups x 4 random options: the DP stops at its work limit (finishing would take over a minute; about
    0.25 s with the fallback on an idle core, which benchmarks rather than this test would time), then the
    greedy."""
    rng = random.Random(5)
    options = [Option(f"g{g}", f"o{k}", rng.randint(100_000, 900_000), rng.uniform(-0.01, 1))
               for g in range(300) for k in range(4)]
    need = int(0.6 * sum(max(o.saving for o in options if o.group == f"g{g}") for g in range(300)))
    for limit in (None, 0):
        plan = solve(options, need) if limit is None else solve(options, need, exact_limit=limit)
        assert plan.method == "greedy"
        check_valid(plan, options, need)
