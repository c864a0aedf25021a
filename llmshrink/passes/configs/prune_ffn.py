"""The prune_ffn pass's settings, torch-free (validate reads them); the pass: passes/prune_ffn.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmshrink.fields import BlockIndices, Regex
from llmshrink.passes.configs.refit_output import RefitOutputConfig
from llmshrink.registry import register_pass


@register_pass("prune_ffn")
class PruneFfnConfig(RefitOutputConfig):
    importance: Literal["magnitude", "activation", "taylor"] = Field(
        "activation",
        description="magnitude: |in rows| x |out column|; activation: mean |activation| on calibration tokens; "
        "taylor: sum over calibration tokens of |activation x gradient| of the LM loss",
    )
    keep: float | None = Field(None, gt=0.0, le=1.0, description="share of neurons kept (0.5 unless ratio is set)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="share of FFN parameters kept, instead of keep")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: the same share in every block; global: rank scores (divided by "
        "their block's mean) across blocks"
    )
    min_keep: int = Field(1, ge=1, description="neurons every block keeps at least")
    multiple_of: int = Field(1, ge=1, description="kept neurons per block are a multiple of this (e.g. 8)")
    targets: Regex = Field(".*", description="regex (full match) of the FFN blocks to prune, e.g. model.layers.3.mlp "
                           "(BERT: the block itself, bert.encoder.layer.3)")
    exclude: Regex | None = Field(None, description="regex (full match) of FFN blocks to leave as they are")
    layers: BlockIndices = None
    calibration_tokens: int = Field(2048, ge=16, description="tokens (from data:) for activation / taylor")

    @model_validator(mode="after")
    def _one_budget(self) -> PruneFfnConfig:
        if self.keep is not None and self.ratio is not None:
            raise ValueError("set keep (share of neurons) or ratio (share of FFN parameters), not both")
        return self
