"""`llmshrink sweep R.yaml --targets 0.9,0.8,0.7`: one planned, recovered model per budget, then their comparison.

Each budget is the recipe with its target's value replaced, written to <output>/<name>-<kind>-<value>. A budget
whose checkpoint is there already is kept (a killed sweep resumes where it stopped), and the decisions'
measurements come from the plan cache and the teacher samples (data: source teacher or mix) from one folder
shared by the budgets, so each further budget only solves, compresses and recovers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from llmshrink.checkpoint import MANIFEST_FILE, RECIPE_FILE
from llmshrink.compare import compare
from llmshrink.engine import run_recipe
from llmshrink.errors import LlmshrinkError
from llmshrink.recipe import load_recipe

SWEEP_SAMPLES = ".sweep-teacher-samples"  # inside the sweep's output folder, kept for a rerun


def parse_targets(text: str) -> list[float]:
    """"0.9,0.8,0.7" -> [0.9, 0.8, 0.7]; a one-line error for anything else."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise LlmshrinkError(f"--targets: {item.strip()!r} is not a number; give budgets like 0.9,0.8,0.7") from None
        if not (math.isfinite(value) and value > 0):
            raise LlmshrinkError(f"--targets: {value:g} is not a budget; budgets are finite and > 0 (up to 1: a share "
                                 "of the base)")
        values.append(value)
    if len(set(values)) != len(values):
        raise LlmshrinkError(f"--targets: {text} gives a budget twice")
    return values


def budget_name(value: float) -> str:
    """A budget as written in folder names and logs: 0.85, or a whole absolute count (1234567), never rounded."""
    return str(int(value)) if value > 1 and value.is_integer() else repr(value)


def sweep(recipe_path: str | Path, targets: list[float], output_dir: str | Path | None = None,
          overrides: list[str] = (), log: Callable[[str], None] = print) -> dict:
    """Apply the recipe once per budget (skipping budgets already done), then compare them all (and the base)
    into `output_dir` (default: the recipe's output.dir). Returns compare's data."""
    first = load_recipe(recipe_path, overrides)
    target = first.recipe.target
    if target is None:
        raise LlmshrinkError(f"{recipe_path}: sweep needs a target: section (its kind is swept); add e.g. "
                             "target: {params: 0.7}")
    out = Path(output_dir or first.recipe.output.dir)
    # Every budget's recipe is read first: a bad one fails before any model is compressed.
    runs = [(budget_name(value), load_recipe(recipe_path, [*overrides, f"target.{target.kind}={value!r}"]))
            for value in targets]
    paths = []
    for name, loaded in runs:
        path = out / f"{first.recipe.name}-{target.kind}-{name}"
        paths.append(path)
        if (path / MANIFEST_FILE).is_file():
            ran = (path / RECIPE_FILE).read_text(encoding="utf-8") if (path / RECIPE_FILE).is_file() else None
            if ran != loaded.text:  # recovery or data changed since: reusing the model would compare another recipe
                raise LlmshrinkError(f"sweep: {path} holds a model of another recipe than {recipe_path} at {target.kind} "
                                     f"{name}; remove it, or sweep into another -o folder")
            log(f"sweep: {target.kind} {name}: {path} is done already")
            continue
        log(f"sweep: {target.kind} {name} -> {path}")
        run_recipe(loaded, output_dir=str(path), log=log, samples_dir=out / SWEEP_SAMPLES)
    return compare(paths, out, log=log)
