"""The lora pass's settings, torch-free (validate reads them); the pass: passes/lora.py."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import BlockIndices, Regex, check_regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass

_ALLOWED = "Linear, Conv1D, LowRankLinear, KroneckerLinear, bitsandbytes Linear4bit/Linear8bitLt (QLoRA)"


@register_pass("lora")
class LoraPassConfig(PassConfig):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="the update B·A is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input while training")
    targets: str | list[str] = Field(
        r".*\.\d+\..*",
        description="regex (or list of regexes) over full module names; default: every layer inside the blocks, "
        f"i.e. the attention and MLP projections (allowed layers: {_ALLOWED})",
    )
    exclude: Regex | None = Field(
        None, description="regex (full match) of module names to leave as they are (without an adapter)"
    )
    layers: BlockIndices = None
    merge: bool = Field(False, description="fold the adapters into the weights at the end of the recipe, "
                        "instead of saving them beside the model in peft's format")

    @field_validator("targets")
    @classmethod
    def _valid_regexes(cls, value: str | list[str]) -> str | list[str]:
        for pattern in [value] if isinstance(value, str) else value:
            check_regex(pattern)
        if isinstance(value, list) and not value:
            raise PydanticCustomError("regex", "give at least one regex")
        return value

    def pattern(self) -> str:
        """`targets` as one regex."""
        return self.targets if isinstance(self.targets, str) else "|".join(f"(?:{p})" for p in self.targets)
