"""Plan a `target:` recipe: measure the search space's decisions, choose the cheapest set that meets the budget,
and write it as ordinary stages.

1. Candidates (candidates.py): per block, drop it, prune its heads or FFN neurons, factorise its layers, or store
   it in another format; each measured alone on a copy of the base (measure.py, cached).
2. Options: per block, every allowed combination of its decisions; saving = the sum of its decisions' exact
   savings (they touch disjoint tensors), cost = the sum of their measured loss increases (an estimate: losses
   need not add up; a measured decrease is calibration noise and counts as 0).
3. Solve (solver.py): at most one option per block, saving >= base - budget, least cost. Exact DP where the
   work fits (equal-sized blocks reach few distinct sums), else the LP greedy with repair.
4. Emit: the chosen decisions as stages (candidates.emit_stages), run by the engine before the recipe's own
   stages; after them, check_planned measures the model: its size must equal the plan's accounting exactly, and
   its calibration loss (KL from the base by default), measured jointly, is recorded beside the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from llmshrink.blocks import find_blocks
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.macs import macs_per_token
from llmshrink.planning.candidates import EMBEDDINGS, Candidate, block_choices, emit_stages, make_candidates
from llmshrink.planning.measure import (
    Measured,
    MeasurementCache,
    cache_file,
    calibration_ids,
    calibration_window,
    measure,
    measure_all,
    reference_log_probs,
)
from llmshrink.planning.solver import Option, Plan, solve
from llmshrink.planning.spec import MACS_SEQ_LEN, SCORE_NAMES, UNITS, SearchSpec, TargetSpec

SIZES = tuple(UNITS.values())  # every size a plan accounts for and check_planned verifies


@dataclass
class Planned:
    stages: list[dict[str, Any]]  # {pass: config} items, in the order they run
    kind: str  # the target's key: params, bytes, macs or decode_speedup
    unit: str  # what the budget counts: params, bytes, macs or decode_macs
    base: Measured
    predicted: dict[str, int]  # the planned model's SIZES by the plan's accounting
    predicted_loss: float  # base loss + the chosen options' costs
    record: dict[str, Any] = field(default_factory=dict)  # what plan.json / the manifest keep
    calibration: torch.Tensor | None = field(default=None, repr=False)  # the token ids measured on
    reference: torch.Tensor | None = field(default=None, repr=False)  # the base's log-probabilities there (kl)


def plan(model: nn.Module, target: TargetSpec, search: SearchSpec | None, ctx: Context, *,
         cache_dir: Path | None, log: Callable[[str], None] = print) -> Planned:
    """Measure, solve and emit for `model` (left unchanged). Refuses an unreachable budget in one line."""
    search = search or SearchSpec()
    kind, unit = target.kind, target.unit
    _, _, blocks = find_blocks(model, "target")
    candidates = make_candidates(len(blocks), search, kind)
    tokens = search.calibration_tokens
    window = calibration_window(model)
    ids = calibration_ids(ctx, tokens, window)
    reference = reference_log_probs(model, ids, window, ctx.device) if search.score == "kl" else None
    cache = MeasurementCache(cache_file(cache_dir, model, ctx, tokens, search.score) if cache_dir is not None else None)
    base, measured = measure_all(model, candidates, ctx, ids, reference, cache, log)
    if not math.isfinite(base.loss):
        raise LlmshrinkError(f"target: the base model's calibration loss is {base.loss}; it cannot be planned for")
    if unit in ("macs", "decode_macs") and not macs_per_token(model, seq_len=MACS_SEQ_LEN)["complete"]:
        raise LlmshrinkError(f"target.{kind}: some of this model's layers run kernels the MAC counter does not know, "
                             "so MACs would be undercounted; plan for params or bytes")

    combos = _options(candidates, measured, base, unit)
    limit = target.limit(base.size(unit))
    smallest = base.size(unit) - _most_saving(combos, len(blocks))
    if smallest > limit:
        reached = (f"the fastest it reaches is {base.size(unit) / smallest:.4f}x" if kind == "decode_speedup" else
                   f"the smallest it reaches is {smallest / base.size(unit):.4f} of the base")
        raise LlmshrinkError(f"target.{kind}: {target.value:g} ({limit:,} {unit}) is out of reach of the search space; "
                             f"{reached} ({smallest:,} {unit})")
    solution = _solve(combos, base.size(unit) - limit, len(blocks), f"target.{kind}")
    chosen = [c for option in solution.chosen.values() for c in combos[option]]
    stages = emit_stages(chosen)
    predicted = {k: base.size(k) - sum(base.size(k) - measured[c.key].size(k) for c in chosen) for k in SIZES}
    planned = Planned(stages, kind, unit, base, predicted, base.loss + solution.cost, calibration=ids, reference=reference)
    planned.record = {
        "target": {kind: target.value, "limit": limit, "base": base.size(unit), "unit": unit},
        "solver": solution.method,
        "score": search.score,
        "calibration_tokens": tokens,
        "base": {"loss": base.loss, **{k: base.size(k) for k in SIZES}},
        "predicted": {**predicted, "loss": planned.predicted_loss},
        "decisions": [{"block": c.block, "decision": c.label, "stage": c.stage, "saving": base.size(unit) -
                       measured[c.key].size(unit), "loss_increase": measured[c.key].loss - base.loss}
                      for c in sorted(chosen, key=lambda c: (c.block, c.slot))],
        "stages": stages,
        "measurements": {c.key: {"block": c.block, "decision": c.label, **vars(measured[c.key])} for c in candidates},
        "cache": str(cache.path) if cache.path else None,
    }
    log(f"  plan ({solution.method}): {len(chosen)} decisions in {len(stages)} stages; {unit} {base.size(unit):,} -> "
        f"{predicted[unit]:,} ({predicted[unit] / base.size(unit):.3f}x, budget {limit:,}); estimated calibration "
        f"{SCORE_NAMES[search.score]} {base.loss:.4f} -> {planned.predicted_loss:.4f}")
    return planned


def _drops(option: Option, combos: dict[Option, tuple[Candidate, ...]]) -> bool:
    return any(c.slot == "block" for c in combos[option])


def _most_saving(combos: dict[Option, tuple[Candidate, ...]], blocks: int) -> int:
    """The most the options can save with at least one block left in place (drop_layers keeps one)."""
    most: dict[str, int] = {}
    kept: dict[str, int] = {}  # the most a block saves without being dropped
    for option in combos:
        most[option.group] = max(most.get(option.group, 0), option.saving)
        if not _drops(option, combos):
            kept[option.group] = max(kept.get(option.group, 0), option.saving)
    total = sum(most.values())
    droppable = {option.group for option in combos if _drops(option, combos)}
    if len(droppable) < blocks:
        return total
    return max(total - most[group] + kept.get(group, 0) for group in droppable)


def _solve(combos: dict[Option, tuple[Candidate, ...]], need: int, blocks: int, field_name: str) -> Plan:
    """solve(), and when its plan drops every block, the cheapest plan that keeps one (each block tried)."""
    solution = solve(combos, need, field_name=field_name)
    if sum(_drops(option, combos) for option in solution.chosen.values()) < blocks:
        return solution
    plans = []
    for group in sorted({option.group for option in combos}):
        options = [o for o in combos if not (o.group == group and _drops(o, combos))]
        try:
            plans.append(solve(options, need, field_name=field_name))
        except LlmshrinkError:
            continue
    return min(plans, key=lambda plan: plan.cost)  # not empty: _most_saving checked a plan that keeps a block


def _options(candidates: list[Candidate], measured: dict[str, Measured], base: Measured,
             unit: str) -> dict[Option, tuple[Candidate, ...]]:
    """Each block's allowed combinations as solver options, with the candidates behind each. Options that save
    nothing go; of options of one block with equal savings, the cheapest stays."""
    by_block: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_block.setdefault(candidate.block, []).append(candidate)
    found: dict[Option, tuple[Candidate, ...]] = {}
    for block, members in sorted(by_block.items()):
        best: dict[int, tuple[Option, tuple[Candidate, ...]]] = {}
        for combo in block_choices(members):
            saving = sum(base.size(unit) - measured[c.key].size(unit) for c in combo)
            increases = [measured[c.key].loss - base.loss for c in combo]
            if saving <= 0 or not all(math.isfinite(x) for x in increases):
                continue  # saves nothing, or broke the model (a NaN loss must not count as free)
            cost = sum(max(0.0, x) for x in increases)
            group = "embeddings" if block == EMBEDDINGS else f"block {block:03d}"
            option = Option(group, " + ".join(c.label for c in combo), saving, cost)
            if saving not in best or (cost, option.name) < (best[saving][0].cost, best[saving][0].name):
                best[saving] = (option, combo)
        found.update(dict(best.values()))
    return found


def check_planned(model: nn.Module, planned: Planned, ctx: Context) -> dict[str, Any]:
    """After the planned stages: the model's exact size must be the plan's; its loss, measured jointly, is
    recorded beside the estimate (the sum of the decisions' losses taken alone)."""
    got = measure(model, planned.calibration, calibration_window(model), ctx.device, planned.reference)
    sizes = {k: got.size(k) for k in SIZES}
    unit = planned.unit
    if sizes[unit] != planned.predicted[unit]:
        raise LlmshrinkError(f"target.{planned.kind}: the planned stages left {sizes[unit]:,} {unit}, the plan counted "
                             f"{planned.predicted[unit]:,}: the decisions' savings do not add up")
    planned.record["measured"] = {**sizes, "loss": got.loss}
    return planned.record["measured"]


def planned_recipe(text: str, stages: list[dict[str, Any]]) -> str:
    """The recipe that ran (YAML text) as an ordinary one: target: and search: replaced by the planned stages,
    which run before its own."""
    raw = yaml.safe_load(text)
    raw.pop("target", None)
    raw.pop("search", None)
    raw["stages"] = [*stages, *(raw.get("stages") or [])]
    header = "# Planned by llmshrink from a target: recipe; running it reproduces the planned model.\n"
    return header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)
