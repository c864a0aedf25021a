"""The kronecker pass's settings, torch-free (validate reads them); the pass: passes/kronecker.py."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from llmshrink.fields import AsTuple, BlockIndices, Exclude, Regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass


@register_pass("kronecker")
class KroneckerConfig(PassConfig):
    targets: Regex = Field(r".*\.mlp\..*", description="regex over full module names (Linear or Conv1D)")
    exclude: Exclude = None
    layers: BlockIndices = None
    select_layers: int | None = Field(
        None, ge=1, description="compress only the N blocks whose compression hurts calibration perplexity least"
    )
    calibration_tokens: int = Field(
        2048, ge=16, description="calibration tokens (from data:) for select_layers (formerly selection_tokens)"
    )
    a_shape: Annotated[tuple[PositiveInt, PositiveInt] | None, AsTuple] = Field(
        None, description="explicit (m1, n1) of factor A; B follows from the layer's shape"
    )
    ratio: float = Field(0.1, gt=0.0, lt=1.0, description="per-layer param budget when a_shape is not given")
    rank: int | None = Field(None, ge=1, description="Kronecker terms; default 1, or the most that fit `ratio`")
    max_rank: int = Field(8, ge=1, description="upper bound on terms when rank is chosen from `ratio`")
    permute: bool = Field(True, description="search row/column permutations that lower the error")
    search_iters: int = Field(20, ge=1, description="alternating-assignment iterations per layer")
    search_restarts: int = Field(2, ge=0, description="structured starts besides identity and norm order")
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )
