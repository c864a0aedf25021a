"""The iterate pass's settings, torch-free (validate reads them); the pass: passes/iterate.py."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmshrink.errors import RecipeError
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass
from llmshrink.stages import parse_stage

# Settings that the group decides, so an inner stage must not set them itself.
_GROUP_FIELDS = ("layers", "select_layers")


@register_pass("iterate")
class IterateConfig(PassConfig):
    stages: list[dict[str, Any]] = Field(..., min_length=1, description="stages to run for every group")
    groups: list[list[int]] | None = Field(None, description="explicit groups of block indices, in order")
    group_size: int = Field(1, ge=1, description="blocks per group when `groups` is not given (1 = per layer)")
    layers: list[int] | None = Field(None, description="blocks to walk through; default: every block")

    @field_validator("stages")
    @classmethod
    def _valid_inner_stages(cls, stages: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        where = info.context or {}
        file, field = where.get("file", "<recipe>"), where.get("field", "iterate")
        grouped = False
        for i, item in enumerate(stages):
            stage = parse_stage(item, file, f"{field}.stages[{i}]")
            fields = type(stage.config).model_fields
            for key in _GROUP_FIELDS:
                if key in stage.config.model_fields_set and getattr(stage.config, key) is not None:
                    raise RecipeError(
                        file, f"{field}.stages[{i}].{stage.name}.{key}",
                        "set by iterate for each group; remove it (give iterate `groups` or `layers`)",
                    )
            grouped = grouped or "layers" in fields
        if not grouped:
            raise RecipeError(
                file, f"{field}.stages",
                "no inner stage takes `layers`, so every group would do the same thing; "
                "add a compression pass or local_distill",
            )
        return stages

    @model_validator(mode="after")
    def _groups_or_layers(self) -> IterateConfig:
        if self.groups is not None and (self.layers is not None or "group_size" in self.model_fields_set):
            raise ValueError("give either `groups`, or `layers`/`group_size`, not both")
        if self.groups is not None and (not self.groups or any(not g for g in self.groups)):
            raise ValueError(f"groups must be non-empty lists of block indices, got {self.groups}")
        return self
