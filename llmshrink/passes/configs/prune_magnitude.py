"""The prune_magnitude pass's settings, torch-free (validate reads them); the pass: passes/prune_magnitude.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import BLOCK_LAYERS, BlockIndices, BlockLayers, Exclude
from llmshrink.passes.base import PassConfig
from llmshrink.passes.configs.distill import DistillConfig
from llmshrink.registry import register_pass

_GRADUAL_ONLY = ("initial_sparsity", "prune_steps", "steps_per_round", "distill")


class RoundDistillConfig(DistillConfig):
    """The distill settings of every round; `steps` comes from the pass's steps_per_round."""

    steps: int | None = Field(None, description="set by prune_magnitude.steps_per_round")

    @field_validator("steps")
    @classmethod
    def _no_steps(cls, steps: int | None) -> int | None:
        if steps is not None:
            raise PydanticCustomError("round_steps", "set by prune_magnitude.steps_per_round; remove it")
        return steps


@register_pass("prune_magnitude")
class PruneMagnitudeConfig(PassConfig):
    targets: BlockLayers = BLOCK_LAYERS
    exclude: Exclude = None
    layers: BlockIndices = None
    sparsity: float = Field(..., ge=0.0, lt=1.0, description="fraction of the targets' weights to remove (final)")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="each target pruned to `sparsity`, or one magnitude ranking over all targets"
    )
    schedule: Literal["one_shot", "gradual"] = Field(
        "one_shot", description="prune at once, or in rounds with distillation in between (Zhu & Gupta)"
    )
    initial_sparsity: float = Field(
        0.0, ge=0.0, lt=1.0, description="gradual: s_i, where the cubic curve starts (t = 0, before round 1)"
    )
    prune_steps: int | None = Field(None, ge=1, description="gradual: number of prune + distill rounds")
    steps_per_round: int | None = Field(None, ge=1, description="gradual: distill optimizer steps after each prune")
    distill: RoundDistillConfig | None = Field(
        None, description="gradual: distill settings for every round (default: the distill pass's defaults)"
    )
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )

    @model_validator(mode="after")
    def _schedule_fields(self) -> PruneMagnitudeConfig:
        if self.schedule == "one_shot":
            given = [key for key in _GRADUAL_ONLY if key in self.model_fields_set]
            if given:
                raise PydanticCustomError(
                    "one_shot_fields", f"{', '.join(given)}: only for schedule: gradual"
                )
            return self
        missing = [key for key in ("prune_steps", "steps_per_round") if getattr(self, key) is None]
        if missing:
            raise PydanticCustomError("gradual_fields", f"schedule: gradual needs {' and '.join(missing)}")
        if self.initial_sparsity > self.sparsity:
            raise PydanticCustomError(
                "gradual_sparsity",
                f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity {self.sparsity}",
            )
        return self
