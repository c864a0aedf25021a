"""Kronecker pass (KnGPT-2, TQCompressedGPT-2): replace dense layers by permuted Kronecker sums."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.decompose.factor_shapes import (
    choose_factor_shapes,
    kronecker_params,
    validate_factor_shapes,
)
from llmshrink.decompose.kronecker_search import search_permutations
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.kronecker import KroneckerLinear, dense_weight
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.kronecker import KroneckerConfig
from llmshrink.sensitivity import group_by_layer, layer_sensitivity, least_sensitive
from llmshrink.targeting import find_targets, layer_index, replace_module, require_causal_lm, untie_targets


def apply(model, cfg: KroneckerConfig, ctx: Context) -> PassRecord:
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers)
    shapes = {name: _layer_shapes(name, dense_weight(module), cfg) for name, module in targets}
    selection = None
    if cfg.select_layers is not None:
        targets, selection = _select_layers(model, targets, shapes, cfg, ctx)
    untied = untie_targets(model, targets, cfg.tied_embeddings, "kronecker", "compress it")
    layers = []
    for name, module in tqdm(targets, desc="kronecker", unit="layer", leave=False):
        start = time.perf_counter()
        weight = dense_weight(module)
        out_features, in_features = weight.shape
        a_shape, b_shape, rank = shapes[name]
        row_perm = col_perm = None
        error_identity = error = None
        if cfg.permute:
            found = search_permutations(
                weight, a_shape, b_shape, rank, iters=cfg.search_iters, restarts=cfg.search_restarts,
                seed=ctx.seed,
            )
            row_perm, col_perm = found.row_perm, found.col_perm
            error, error_identity = found.error, found.error_identity
        new = KroneckerLinear.from_linear(module, a_shape, b_shape, rank, row_perm=row_perm, col_perm=col_perm)
        if error is None:
            with torch.no_grad():
                error = float((new.to_dense() - weight).norm() / weight.norm())
        replace_module(model, name, new)
        dense_params = weight.numel()
        layers.append(
            {
                "name": name,
                "shape": [out_features, in_features],
                "a_shape": list(a_shape),
                "b_shape": list(b_shape),
                "rank": rank,
                "permuted": cfg.permute,
                "rel_error": round(error, 6),
                "rel_error_no_permutation": None if error_identity is None else round(error_identity, 6),
                "params_before": dense_params,
                "params_after": kronecker_params(a_shape, b_shape, rank),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        ctx.log(
            f"  {name}: {out_features}x{in_features} -> {a_shape[0]}x{a_shape[1]} ⊗ {b_shape[0]}x{b_shape[1]}"
            f" x{rank}, rel. error {error:.4f}"
            + (f" (no permutation: {error_identity:.4f})" if error_identity is not None else "")
        )
    return {
        "selection": selection,
        "layers": layers,
        "untied": untied,
        "params_before": sum(layer["params_before"] for layer in layers),
        "params_after": sum(layer["params_after"] for layer in layers),
    }


def _select_layers(model, targets, shapes, cfg: KroneckerConfig, ctx: Context):
    """Keep the targets of the `select_layers` blocks that hurt calibration perplexity least."""
    require_causal_lm(model, "kronecker.select_layers: ranks blocks by calibration perplexity",
                      "name the blocks in layers instead")
    groups = group_by_layer(targets)
    if cfg.select_layers > len(groups):
        raise LlmshrinkError(
            f"kronecker.select_layers: {cfg.select_layers} blocks asked for, the targets span {len(groups)}"
        )
    ids = ctx.train_token_ids()[: cfg.calibration_tokens]
    window = min(256, len(ids))

    def compress(name, module):
        return KroneckerLinear.from_linear(module, *shapes[name])

    ctx.log(f"  measuring {len(groups)} blocks on {len(ids)} calibration tokens to choose {cfg.select_layers}")
    scores = layer_sensitivity(model, groups, compress, ids, window)
    chosen = least_sensitive(scores, cfg.select_layers)
    ctx.log(f"  chosen blocks: {chosen}")
    kept = [(name, module) for name, module in targets if layer_index(name) in chosen]
    return kept, {"calibration_ppl": {str(k): round(v, 3) for k, v in scores.items()}, "chosen": chosen}


def _layer_shapes(name: str, weight, cfg: KroneckerConfig):
    out_features, in_features = weight.shape
    try:
        if cfg.a_shape is not None:
            m1, n1 = cfg.a_shape
            b_shape = (out_features // m1, in_features // n1)
            validate_factor_shapes(out_features, in_features, (m1, n1), b_shape)
            return (m1, n1), b_shape, cfg.rank or 1
        choice = choose_factor_shapes(weight, cfg.ratio, rank=cfg.rank, max_rank=cfg.max_rank)
        return tuple(choice.a_shape), tuple(choice.b_shape), choice.rank
    except LlmshrinkError as err:
        raise LlmshrinkError(f"kronecker: {name}: {err}") from None
