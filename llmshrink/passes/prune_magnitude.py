"""Magnitude pruning pass: remove the smallest weights, one-shot or gradually (Zhu & Gupta, 2017).

Each target becomes a SparseLinear that stores only its kept weights plus a one-bit-per-weight mask,
so the size on disk really drops (fp32 at 50% sparsity: 2.125 instead of 4 bytes per weight).

    one_shot   prune every target to `sparsity` at once.
    gradual    `prune_steps` rounds t = 1..n: prune to s_t = s_f + (s_i - s_f)(1 - t/n)^3, then
               distil for `steps_per_round` steps (the `distill` pass, settings from `distill:`).

`scope: per_layer` removes the same fraction from every target; `scope: global` ranks all targets'
weights together, so layers with many small weights lose more. During gradual training the layers are
already SparseLinear: pruned weights are not stored at all, so they stay exactly zero whatever the
optimizer does, and later rounds only prune among the survivors.
"""

from __future__ import annotations

import time

import torch

from llmshrink.context import Context
from llmshrink.modules.sparse import SparseLinear, dense_weight
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.distill import DistillConfig
from llmshrink.passes.configs.prune_magnitude import PruneMagnitudeConfig, RoundDistillConfig
from llmshrink.registry import get_pass
from llmshrink.targeting import find_targets, replace_module, require_causal_lm, untie_targets


def cubic_schedule(initial: float, final: float, rounds: int) -> list[float]:
    """Zhu & Gupta's sparsity after each round t = 1..n: s_f + (s_i - s_f)(1 - t/n)^3 (the last is s_f)."""
    return [final + (initial - final) * (1 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def smallest(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, float | None]:
    """(bool mask of exactly `count` lowest-scoring entries of a 1-D tensor, the highest score among them).

    Ties at the threshold are broken by position (earlier first), so the count is always exact.
    """
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if count == 0:
        return prune, None
    threshold = scores.kthvalue(count).values
    prune |= scores < threshold
    ties = (scores == threshold).nonzero().flatten()
    prune[ties[: count - int(prune.sum())]] = True
    return prune, float(threshold)


def apply(model, cfg: PruneMagnitudeConfig, ctx: Context) -> PassRecord:
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers)
    if cfg.schedule == "gradual":
        require_causal_lm(model, "prune_magnitude.schedule: gradual distils between rounds", "use schedule: one_shot")
    untied = untie_targets(model, targets, cfg.tied_embeddings, "prune_magnitude", "prune it")
    names = [name for name, _ in targets]
    before = {name: (list(dense_weight(m).shape), dense_weight(m).numel() * dense_weight(m).element_size())
              for name, m in targets}
    if cfg.schedule == "one_shot":
        schedule = [cfg.sparsity]
    else:
        schedule = cubic_schedule(cfg.initial_sparsity, cfg.sparsity, cfg.prune_steps)
    rounds, thresholds = [], {}
    work_dir = ctx.work_dir
    try:
        for t, target in enumerate(schedule, 1):
            start = time.perf_counter()
            thresholds = _prune(model, names, target, cfg.scope)
            sparse = [model.get_submodule(name) for name in names]
            kept = sum(layer.nnz for layer in sparse)
            total = sum(layer.in_features * layer.out_features for layer in sparse)
            step = {"round": t, "target_sparsity": round(target, 6), "sparsity": round(1 - kept / total, 6),
                    "nnz": kept, "prune_seconds": round(time.perf_counter() - start, 3)}
            if cfg.scope == "global":
                step["threshold"] = thresholds[names[0]]
            ctx.log(f"prune_magnitude: round {t}/{len(schedule)}: sparsity {step['sparsity']:.4f} "
                    f"({kept:,} of {total:,} weights kept)")
            if cfg.schedule == "gradual":
                if work_dir is not None:  # each round's distillation resumes from its own folder
                    ctx.work_dir = work_dir / f"round-{t}"
                settings = (cfg.distill or RoundDistillConfig()).model_dump(exclude={"steps"})
                # Through the registry, as iterate runs its stages: a pass imports no other pass.
                step["distill"] = get_pass("distill").apply(
                    model, DistillConfig(**settings, steps=cfg.steps_per_round), ctx
                )
                if ctx.evaluate is not None and t < len(schedule):  # the engine measures after the last
                    step[ctx.evaluate_name] = ctx.evaluate(model)
                    ctx.log(f"prune_magnitude: {ctx.evaluate_name} after round {t}: {step[ctx.evaluate_name]:.2f}")
            rounds.append(step)
    finally:
        ctx.work_dir = work_dir
    layers = [_layer_record(name, model.get_submodule(name), *before[name], thresholds[name]) for name in names]
    params = sum(x["params"] for x in layers)
    nnz = sum(x["nnz"] for x in layers)
    bytes_before = sum(x["bytes_before"] for x in layers)
    bytes_after = sum(x["bytes_after"] for x in layers)
    return {
        "sparsity": round(1 - nnz / params, 6),
        "target_sparsity": cfg.sparsity,
        "scope": cfg.scope,
        "schedule": cfg.schedule,
        "initial_sparsity": cfg.initial_sparsity if cfg.schedule == "gradual" else None,
        "sparsity_per_round": [x["target_sparsity"] for x in rounds],
        "rounds": rounds,
        "storage": "values in the weight dtype + 1-bit mask packed into uint8",
        "layers": layers,
        "untied": untied,
        "params": params,
        "nnz": nnz,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": round(bytes_after / bytes_before, 6),
    }


@torch.no_grad()
def _prune(model, names: list[str], sparsity: float, scope: str) -> dict[str, float | None]:
    """Replace every named layer (dense or SparseLinear) by a SparseLinear at `sparsity`; the thresholds.

    Already-pruned weights score -1, below every magnitude, so they are counted first and stay pruned.
    """
    modules = {name: model.get_submodule(name) for name in names}
    scores = {}
    for name, module in modules.items():
        if isinstance(module, SparseLinear):
            scores[name] = torch.where(module.kept(), module.to_dense().abs().float(), -1.0).flatten()
        else:
            scores[name] = dense_weight(module).abs().float().flatten()
    prune: dict[str, torch.Tensor] = {}
    thresholds: dict[str, float | None] = {}
    if scope == "global":
        everything = torch.cat(list(scores.values()))
        pruned, threshold = smallest(everything, round(sparsity * everything.numel()))
        for name, part in zip(names, pruned.split([s.numel() for s in scores.values()]), strict=True):
            prune[name], thresholds[name] = part, threshold
    else:
        for name, score in scores.items():
            prune[name], thresholds[name] = smallest(score, round(sparsity * score.numel()))
    # -1: this round only met weights pruned before (its sparsity did not grow), so it pruned nothing new.
    thresholds = {name: None if t is None or t < 0 else t for name, t in thresholds.items()}
    for name, module in modules.items():
        shape = (module.out_features, module.in_features) if isinstance(module, SparseLinear) else \
            tuple(dense_weight(module).shape)
        replace_module(model, name, SparseLinear.from_linear(module, ~prune[name].view(shape)))
    return thresholds


def _layer_record(name: str, layer: SparseLinear, shape: list[int], bytes_before: int,
                  threshold: float | None) -> dict:
    values_bytes = layer.values.numel() * layer.values.element_size()
    mask_bytes = layer.mask.numel() * layer.mask.element_size()
    params = layer.in_features * layer.out_features
    return {
        "name": name,
        "shape": shape,
        "params": params,
        "nnz": layer.nnz,
        "sparsity": round(1 - layer.nnz / params, 6),
        "threshold": threshold,  # the largest pruned magnitude in the last round (None: nothing pruned)
        "values_bytes": values_bytes,
        "mask_bytes": mask_bytes,
        "bytes_before": bytes_before,
        "bytes_after": values_bytes + mask_bytes,
    }
