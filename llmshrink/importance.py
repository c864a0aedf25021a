"""Importance scores for structured pruning: from the weights alone, or measured on calibration text.

prune_ffn and prune_heads each define how to score their units (`magnitude` from weights, `calibration`
on token ids: an activation/output norm, or Taylor's |a·∂L/∂a|); this picks the one the recipe asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError

Scores = dict[str, torch.Tensor]


def importance_scores(
    pass_name: str,
    importance: str,
    encoder: bool,
    ctx: Context,
    calibration_tokens: int,
    magnitude: Callable[[], Scores],
    calibration: Callable[[torch.Tensor, bool], Scores],
    alternatives: str,
    model_name: str,
) -> tuple[Scores, int | None]:
    """(scores per block, calibration tokens used or None); Taylor needs a causal LM loss, so no encoder."""
    if importance == "magnitude":
        return magnitude(), None
    if importance == "taylor" and encoder:
        raise LlmshrinkError(
            f"{pass_name}.importance: 'taylor' needs a causal LM loss and {model_name} is an encoder; "
            f"use {alternatives}"
        )
    ids = ctx.train_token_ids()[:calibration_tokens]
    ctx.log(f"  {importance} importance on {ids.numel()} calibration tokens")
    return calibration(ids, importance == "taylor"), int(ids.numel())
