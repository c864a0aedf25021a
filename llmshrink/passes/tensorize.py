"""Tensorize pass: replace dense layers by Tucker, CP or tensor-train factors of their reshaped weight."""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.decompose.tensor_factor import choose_ranks, decompose, tensor_shape
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.kronecker import dense_weight
from llmshrink.modules.tensorized import TensorizedLinear
from llmshrink.passes.base import PassConfig, PassRecord
from llmshrink.registry import register_pass
from llmshrink.targeting import find_targets, replace_module, shared_weight_names

DEFAULT_RATIO = 0.25


class TensorizeConfig(PassConfig):
    targets: str = Field(r".*\.mlp\..*", description="regex over full module names (Linear or Conv1D)")
    exclude: str | None = Field(None, description="regex of module names to leave dense")
    layers: list[int] | None = Field(None, description="only these block indices")
    method: Literal["tucker", "cp", "tt"] = Field("tt", description="Tucker, CP (parafac) or tensor-train")
    shape: tuple[list[int], list[int]] | dict[int, list[int]] | None = Field(
        None,
        description="[[out factors], [in factors]] for every target, or {dimension: factors} (e.g. "
        "{1536: [32, 48], 576: [24, 24]}) for targets of several shapes; unset dimensions are split evenly",
    )
    modes_per_side: int = Field(2, ge=1, description="factors of out and of in when the shape is automatic")
    rank: int | list[int] | None = Field(
        None,
        description="an int caps every rank (tucker: per mode, tt: per bond, cp: terms); a list gives them "
        "exactly (tucker: one per mode, tt: one per bond, cp: one)",
    )
    ratio: float | None = Field(
        None, gt=0.0, description=f"params budget per layer; the largest uniform rank that fits (default "
        f"{DEFAULT_RATIO} when rank is unset)"
    )
    randomized: bool = Field(
        False, description="randomised SVD (tucker, tt) / random init (cp): faster, slightly less accurate"
    )
    n_iter_max: int = Field(100, ge=1, description="HOOI (tucker) / ALS (cp) iterations at most")
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TensorizeConfig:
        if self.rank is not None and self.ratio is not None:
            raise ValueError("set rank or ratio, not both")
        ranks = [self.rank] if isinstance(self.rank, int) else self.rank or []
        if any(r < 1 for r in ranks) or self.rank == []:
            raise ValueError(f"rank must be positive integers, got {self.rank}")
        pairs = list(self.shape.items()) if isinstance(self.shape, dict) else []
        if self.shape is not None and not isinstance(self.shape, dict):
            pairs = [(None, self.shape[0]), (None, self.shape[1])]
        for dim, factors in pairs:
            if not factors or min(factors) < 1 or (dim is not None and math.prod(factors) != dim):
                raise ValueError(f"shape: factors {factors} must be positive integers" +
                                 (f" whose product is {dim}" if dim is not None else ""))
        return self


def apply(model, cfg: TensorizeConfig, ctx: Context) -> PassRecord:
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers)
    ratio = DEFAULT_RATIO if cfg.rank is None and cfg.ratio is None else cfg.ratio
    # Check every target before decomposing any, so a bad shape or rank fails fast.
    plans = {name: _plan(name, dense_weight(module), cfg, ratio) for name, module in targets}
    tied = {name: shared_weight_names(model, name) for name, _ in targets}
    for name, tied_to in tied.items():
        if tied_to and cfg.tied_embeddings == "refuse":
            raise LlmshrinkError(
                f"tensorize.targets: {name} shares its weight with {', '.join(tied_to)} (tied embeddings); "
                "exclude it, or set tied_embeddings: untie to compress it alone (the other stays dense)"
            )
    layers, untied = [], []
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
        if tied[name]:
            untied.append(name)
            model.config.tie_word_embeddings = False
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
        "params_replaced": sum(layer["params_before"] for layer in layers),
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


register_pass("tensorize", TensorizeConfig, apply)
