"""Tensorize pass: replace dense layers by Tucker, CP or tensor-train factors of their reshaped weight."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.decompose.tensor_factor import choose_ranks, decompose, tensor_shape
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.tensorized import TensorizedLinear
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.tensorize import DEFAULT_RATIO, TensorizeConfig
from llmshrink.targeting import dense_weight, find_targets, replace_module, untie_targets


def apply(model, cfg: TensorizeConfig, ctx: Context) -> PassRecord:
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers)
    ratio = DEFAULT_RATIO if cfg.rank is None and cfg.ratio is None else cfg.ratio
    # Check every target before decomposing any, so a bad shape or rank fails fast.
    plans = {name: _plan(name, dense_weight(module), cfg, ratio) for name, module in targets}
    untied = untie_targets(model, targets, cfg.tied_embeddings, "tensorize", "compress it")
    layers = []
    for name, module in tqdm(targets, desc="tensorize", unit="layer", leave=False):
        start = time.perf_counter()
        weight = dense_weight(module)
        out_shape, in_shape, ranks = plans[name]
        factors = decompose(weight, cfg.method, out_shape, in_shape, ranks, randomized=cfg.randomized,
                            n_iter_max=cfg.n_iter_max, seed=ctx.seed)
        bias = getattr(module, "bias", None)
        new = TensorizedLinear.from_factors(
            cfg.method, (out_shape, in_shape), [f.to(weight.dtype) for f in factors], bias
        )
        with torch.no_grad():
            error = float((new.to_dense().float() - weight.float()).norm() / weight.float().norm())
        replace_module(model, name, new)
        layers.append(
            {
                "name": name,
                "method": cfg.method,
                "shape": list(weight.shape),
                "tensor_shape": [out_shape, in_shape],
                "ranks": new.ranks,
                "params_before": weight.numel(),
                "params_after": new.factor_params(),
                "macs_per_token": new.macs_per_row,
                "rel_error": round(error, 6),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        ctx.log(
            f"  {name}: {weight.shape[0]}x{weight.shape[1]} -> {cfg.method} {out_shape}x{in_shape} "
            f"ranks {new.ranks}, params {weight.numel()} -> {new.factor_params()}, rel. error {error:.4f}"
        )
    return {
        "method": cfg.method,
        "randomized": cfg.randomized,
        "layers": layers,
        "untied": untied,
        "params_before": sum(layer["params_before"] for layer in layers),
        "params_after": sum(layer["params_after"] for layer in layers),
    }


def _plan(name: str, weight: torch.Tensor, cfg: TensorizeConfig, ratio: float | None):
    """(out_shape, in_shape, ranks) for one layer; errors name the layer."""
    out_features, in_features = weight.shape
    try:
        out_shape, in_shape = tensor_shape(out_features, in_features, cfg.modes_per_side, cfg.shape)
        ranks = choose_ranks(cfg.method, out_shape + in_shape, cfg.rank, ratio)
    except LlmshrinkError as err:
        raise LlmshrinkError(f"tensorize: {name} ({out_features}x{in_features}): {err}") from None
    return out_shape, in_shape, ranks
