"""`llmshrink plan`: plan a target: recipe as `apply` would, without compressing: the decisions and the ordinary
recipe they make."""

from __future__ import annotations

from pathlib import Path

import torch

from llmshrink.engine import (
    SAMPLES_DIR,
    context_for,
    model_spec_of,
    plan_cache_dir,
    resolve_device,
    work_dir_for,
)
from llmshrink.errors import LlmshrinkError
from llmshrink.planning.planner import Planned, planned_recipe
from llmshrink.planning.planner import plan as plan_target
from llmshrink.recipe import LoadedRecipe


def plan_recipe(loaded: LoadedRecipe, log=print) -> tuple[Planned, str]:
    """Plan a target: recipe without compressing: (the plan, the emitted recipe's text). Teacher samples go where
    `apply` finds them, and the measurements to the plan cache, so a later `apply` repeats neither."""
    from llmshrink.models import load_base_model

    recipe = loaded.recipe
    if recipe.target is None:
        raise LlmshrinkError(f"{loaded.path}: target: has no budget to plan for; add e.g. target: {{params: 0.7}}")
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    model_spec = model_spec_of(recipe)
    base = load_base_model(model_spec, device=device, log=log)
    model = base.model.requires_grad_(False).eval()  # planning takes its decisions on copies: it is the teacher too
    samples_dir = work_dir_for(Path(recipe.output.dir)) / SAMPLES_DIR
    ctx = context_for(recipe, model_spec, base.tokenizer, device, model, samples_dir, log)
    planned = plan_target(model, recipe.target, recipe.search, ctx, cache_dir=plan_cache_dir(), log=log)
    return planned, planned_recipe(loaded.text, planned.stages)
