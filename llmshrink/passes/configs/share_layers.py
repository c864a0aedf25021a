"""The share_layers pass's settings, torch-free (validate reads them); the pass: passes/share_layers.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass


@register_pass("share_layers")
class ShareLayersConfig(PassConfig):
    mode: Literal["repeat", "map", "select"] | None = Field(
        None, description="repeat: [0,0,2,2,...]; map: share_map; select: merge similar neighbours down to "
        "unique_blocks (default: map if share_map is set, select if unique_blocks is, else repeat)"
    )
    share_map: list[int] | None = Field(None, description="for each position, the original block it runs")
    unique_blocks: int | None = Field(None, ge=1, description="select: how many distinct blocks remain")
    select: Literal["weights", "outputs"] = Field(
        "weights", description="select: cosine of adjacent blocks' flattened weights, or of their outputs "
        "(residual updates) on calibration tokens"
    )
    calibration_tokens: int = Field(
        2048, ge=16, description="calibration tokens (from data:) for select: outputs"
    )
    init: Literal["first", "average"] = Field(
        "first",
        description="a shared block is the block share_map names, or the mean of its positions' blocks",
    )

    @model_validator(mode="after")
    def _one_way(self) -> ShareLayersConfig:
        if self.share_map is not None and self.unique_blocks is not None:
            raise ValueError("set share_map (mode: map) or unique_blocks (mode: select), not both")
        mode = self.resolved_mode
        if mode == "map" and self.share_map is None:
            raise ValueError("mode: map needs share_map")
        if mode == "select" and self.unique_blocks is None:
            raise ValueError("mode: select needs unique_blocks")
        if mode == "repeat" and (self.share_map is not None or self.unique_blocks is not None):
            raise ValueError("mode: repeat takes neither share_map nor unique_blocks")
        return self

    @property
    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if self.share_map is not None:
            return "map"
        return "select" if self.unique_blocks is not None else "repeat"
