"""The cluster pass's settings, torch-free (validate reads them); the pass: passes/cluster.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import BLOCK_LAYERS, BlockIndices, BlockLayers, Exclude
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass


@register_pass("cluster")
class ClusterConfig(PassConfig):
    targets: BlockLayers = BLOCK_LAYERS
    exclude: Exclude = None
    layers: BlockIndices = None
    clusters: int | None = Field(None, ge=2, le=256, description="shared values per layer (give this or bits)")
    bits: int | None = Field(None, ge=1, le=8, description="bits per index: clusters = 2**bits (or clusters)")
    init: Literal["forgy", "density", "linear"] = Field(
        "linear", description="centroid start: random weights, CDF quantiles, or evenly spaced (Han et al.'s best)"
    )
    iters: int = Field(300, ge=1, description="Lloyd iterations at most")
    tol: float = Field(1e-6, ge=0.0, description="stop when no centroid moves more than tol x the weight range")
    per: Literal["layer"] = Field("layer", description="one codebook per layer")
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )

    @model_validator(mode="after")
    def _one_size(self) -> ClusterConfig:
        if (self.clusters is None) == (self.bits is None):
            both = ", not both" if self.clusters is not None else ""
            raise PydanticCustomError("cluster_size", f"set clusters (2..256) or bits (1..8){both}")
        return self

    @property
    def k(self) -> int:
        return self.clusters if self.clusters is not None else 2**self.bits
