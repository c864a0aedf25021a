"""The quantize pass's settings, torch-free (validate reads them); the pass: passes/quantize.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import AsTuple, Regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass

if TYPE_CHECKING:
    from llmshrink.bnb import BnbSpec

# The bitsandbytes methods, as llmshrink.bnb names them (that module imports torch; a test checks they agree).
BNB_FOUR_BIT = ("bnb-nf4", "bnb-fp4")
BNB_METHODS = (*BNB_FOUR_BIT, "bnb-int8")
BUILT = ("fp16", "bf16", "int8-dynamic", *BNB_METHODS, "mixed")
PLANNED: tuple[str, ...] = ()  # methods refused when the recipe is read, as not built yet
MIXED_FORMATS = ("fp32", "int8-dynamic", *BNB_METHODS)


@register_pass("quantize")
class QuantizeConfig(PassConfig):
    method: str = Field(..., description=f"one of {', '.join(BUILT)}")
    targets: Regex = Field(
        r".*\.\d+\..*",
        description="int8-dynamic, bnb-*, mixed: regex over full Linear/Conv1D names (default: inside the blocks)",
    )
    exclude: Regex | None = Field(
        None, description="int8-dynamic, bnb-*, mixed: regex (full match) of module names to leave as they are"
    )
    layers: list[int] | None = Field(None, description="int8-dynamic, bnb-*, mixed: only these block indices")
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="int8-dynamic, bnb-*, mixed, a target tied to the embeddings (lm_head): refuse, or "
        "untie it so that it runs quantized while the embedding stays float (more bytes, faster decode); "
        "int8-dynamic with embeddings: true, an embedding tied to the lm_head: refuse, or untie it so that it is "
        "stored in int8 while the lm_head keeps a float copy",
    )
    embeddings: bool = Field(
        False, description="int8-dynamic: also store the nn.Embedding tables named by embedding_targets in int8, "
        "one fp32 scale per row (Int8Embedding; about a quarter of their bytes)",
    )
    embedding_targets: Regex = Field(
        r".*embeddings.*|.*embed_tokens",
        description="int8-dynamic with embeddings: true: regex over full nn.Embedding names (exclude applies too, "
        "layers does not); GPT-2's are transformer.wte|transformer.wpe",
    )
    budget: float | None = Field(
        None, gt=0.0, le=1.0, validate_default=True,
        description="mixed (required): bytes of the targets after quantizing, as a fraction of their fp32 bytes",
    )
    choices: Annotated[tuple[str, ...], AsTuple] = Field(
        ("bnb-nf4", "int8-dynamic", "fp32"),
        description=f"mixed: the formats a layer may get, of {', '.join(MIXED_FORMATS)} (at most one bnb-*)",
    )
    calibration_tokens: int = Field(
        512, ge=16, description="mixed: calibration tokens (from data:) of each layer's sensitivity measurement"
    )
    double_quant: bool = Field(True, description="bnb-nf4, bnb-fp4: store the per-block absmax in 8 bits too")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="bnb-nf4, bnb-fp4: dtype the 4-bit weights are dequantized to for the matmul"
    )
    int8_threshold: float = Field(
        6.0, ge=0.0, description="bnb-int8: input columns with a value above this run in fp16 (0 = none)"
    )

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method in PLANNED:
            raise PydanticCustomError(
                "not_built", f"{method!r} is not built yet in this version; available: {', '.join(BUILT)}"
            )
        if method not in BUILT:
            raise PydanticCustomError("method", f"{method!r} is not a method; allowed: {', '.join(BUILT + PLANNED)}")
        return method

    @field_validator("budget")
    @classmethod
    def _budget_for_mixed(cls, budget: float | None, info: ValidationInfo) -> float | None:
        method = info.data.get("method")
        if method == "mixed" and budget is None:
            raise PydanticCustomError("budget_missing", "required for method mixed: the targets' bytes after "
                                      "quantizing, as a fraction in (0, 1] of their fp32 bytes")
        if budget is not None:
            _only_for("mixed", info)
        return budget

    @field_validator("choices", "calibration_tokens")
    @classmethod
    def _for_mixed(cls, value: object, info: ValidationInfo) -> object:
        _only_for("mixed", info)
        if info.field_name == "choices":
            _check_choices(value)
        return value

    @field_validator("embeddings", "embedding_targets")
    @classmethod
    def _for_int8_dynamic(cls, value: object, info: ValidationInfo) -> object:
        # Runs only for keys the recipe sets: embeddings of another method would be silently ignored.
        _only_for("int8-dynamic", info)
        return value

    @field_validator("double_quant", "compute_dtype", "int8_threshold")
    @classmethod
    def _for_its_method(cls, value: object, info: ValidationInfo) -> object:
        # Runs only for keys the recipe sets: a setting of another method is a misplaced key, not a no-op.
        methods = list(BNB_FOUR_BIT) if info.field_name != "int8_threshold" else ["bnb-int8"]
        method = info.data.get("method")
        if method == "mixed" and set(methods) & set(info.data.get("choices", ())):
            return value  # the setting of mixed's bitsandbytes format
        if method is not None and method not in methods:
            also = f" (or mixed with {' or '.join(methods)} among its choices)" if method == "mixed" else ""
            raise PydanticCustomError("method_setting",
                                      f"only for method {' or '.join(methods)}{also}, not {method!r}")
        return value

    def bnb_spec(self) -> BnbSpec:
        from llmshrink.bnb import BnbSpec

        return BnbSpec(self.method, self.double_quant, self.compute_dtype, self.int8_threshold)


def _only_for(method: str, info: ValidationInfo) -> None:
    """Refuse a setting of one method given with another (None: the method field failed, reported itself)."""
    given = info.data.get("method")
    if given not in (None, method):
        raise PydanticCustomError("method_setting", f"only for method {method}, not {given!r}")


def _check_choices(choices: tuple[str, ...]) -> None:
    unknown = [fmt for fmt in choices if fmt not in MIXED_FORMATS]
    if unknown:
        raise PydanticCustomError("choices", f"{unknown[0]!r} is not a format; allowed: {', '.join(MIXED_FORMATS)}")
    if len(set(choices)) != len(choices):
        raise PydanticCustomError("choices", "each format at most once")
    if len(choices) < 2:
        raise PydanticCustomError("choices", "at least two formats to choose between")
    bnb_formats = [fmt for fmt in choices if fmt in BNB_METHODS]
    if len(bnb_formats) > 1:
        raise PydanticCustomError("choices", f"at most one bitsandbytes format, not {' and '.join(bnb_formats)}: "
                                  "a checkpoint's quantization_config describes one")
