"""The drop_layers pass's settings, torch-free (validate reads them); the pass: passes/drop_layers.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass


@register_pass("drop_layers")
class DropLayersConfig(PassConfig):
    layers: list[int] | None = Field(None, description="indices of the blocks to remove ([] removes none)")
    keep: int | None = Field(None, ge=1, description="how many blocks remain, chosen by select")
    select: Literal["influence", "first"] = Field(
        "influence",
        description="keep: remove the blocks of least influence (1 - cos(input, output) on "
        "calibration tokens), or keep the first `keep` blocks",
    )
    calibration_tokens: int = Field(
        2048, ge=16, description="calibration tokens (from data:) for select: influence"
    )

    @model_validator(mode="after")
    def _one_way(self) -> DropLayersConfig:
        if (self.layers is None) == (self.keep is None):
            raise ValueError("set exactly one of layers (blocks to remove) or keep (how many blocks remain)")
        if self.layers is not None and "select" in self.model_fields_set:
            raise ValueError("select chooses the blocks for keep; layers names them already")
        return self
