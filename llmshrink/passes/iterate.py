"""Iterate pass: run a few stages once per group of blocks (TQCompressedGPT-2's multi-step compression).

    - iterate:
        group_size: 2                 # or groups: [[0, 1], [2, 3]]; group_size 1 = per layer
        layers: [4, 5, 6, 7]          # default: every block of the model
        stages:
          - kronecker: {a_shape: [32, 24], rank: 4, permute: false}
          - local_distill: {steps: 20}
          - distill: {steps: 10, train: compressed}

For each group in turn, every inner stage runs once; inner stages that have a `layers` setting
(compression passes, local_distill) get the group's blocks, the others (distill) run as written.
So later groups are compressed and trained with the earlier ones already compressed and recovered.
"""

from __future__ import annotations

import time

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.iterate import IterateConfig
from llmshrink.registry import get_pass
from llmshrink.stages import parse_stage
from llmshrink.targeting import is_dense_layer, layer_index


def block_groups(model, cfg: IterateConfig) -> list[list[int]]:
    """The groups to walk through, checked against the blocks the model has."""
    blocks = sorted({i for n, m in model.named_modules() if is_dense_layer(m) and (i := layer_index(n)) is not None})
    if cfg.groups is not None:
        groups = [list(g) for g in cfg.groups]
    else:
        layers = cfg.layers if cfg.layers is not None else blocks
        groups = [list(layers[i : i + cfg.group_size]) for i in range(0, len(layers), cfg.group_size)]
    unknown = sorted({i for g in groups for i in g} - set(blocks))
    if unknown:
        raise LlmshrinkError(f"iterate: blocks {unknown} do not exist; the model has blocks {blocks[0]}..{blocks[-1]}")
    if not groups:
        raise LlmshrinkError("iterate.layers: empty; give at least one block")
    return groups


def apply(model, cfg: IterateConfig, ctx: Context) -> PassRecord:
    groups = block_groups(model, cfg)
    stages = [parse_stage(item, "<recipe>", f"iterate.stages[{i}]") for i, item in enumerate(cfg.stages)]
    work_dir, runs = ctx.work_dir, []
    ctx.log(f"iterate: {len(groups)} groups x {len(stages)} stages: {groups}")
    try:
        for g, group in enumerate(groups):
            run: dict = {"group": group, "stages": []}
            for j, stage in enumerate(stages):
                config = stage.config
                if "layers" in type(config).model_fields:
                    config = config.model_copy(update={"layers": group})
                ctx.log(f"iterate: group {g + 1}/{len(groups)} {group}: {stage.name}")
                if work_dir is not None:  # each inner stage resumes from its own folder
                    ctx.work_dir = work_dir / f"group-{g}-stage-{j}-{stage.name}"
                start = time.perf_counter()
                record = get_pass(stage.name).apply(model, config, ctx)
                run["stages"].append({"pass": stage.name, "record": record,
                                      "seconds": round(time.perf_counter() - start, 3)})
            if ctx.evaluate is not None:
                run[ctx.evaluate_name] = ctx.evaluate(model)
                ctx.log(f"iterate: {ctx.evaluate_name} after group {g + 1}/{len(groups)}: "
                        f"{run[ctx.evaluate_name]:.4g}")
            runs.append(run)
    finally:
        ctx.work_dir = work_dir
    return {"groups": groups, "runs": runs}
