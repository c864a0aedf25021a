"""The prune_heads pass's settings, torch-free (validate reads them); the pass: passes/prune_heads.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmshrink.fields import BlockIndices, Regex
from llmshrink.passes.configs.refit_output import RefitOutputConfig
from llmshrink.registry import register_pass


@register_pass("prune_heads")
class PruneHeadsConfig(RefitOutputConfig):
    importance: Literal["output_norm", "taylor", "magnitude"] = Field(
        "output_norm",
        description="output_norm: mean L2 norm of a head's output-projected contribution on calibration tokens; "
        "taylor: |dL/d gate| of a head gate on the LM loss (causal LMs); magnitude: norm of the head's weights",
    )
    unit: Literal["kv_group", "query_head"] = Field(
        "kv_group", description="kv_group: remove a key-value head with its query heads (one head without GQA); "
        "query_head: remove query heads only, the same number from every kv group of a layer (needs GQA, e.g. "
        "Gemma 3 270M with one kv head)"
    )
    keep: float | None = Field(
        None, gt=0.0, le=1.0, description="share of query heads kept, rounded down to whole units (0.5 unless "
        "heads_per_layer)"
    )
    heads_per_layer: int | None = Field(
        None, ge=1, description="query heads each pruned layer keeps, instead of keep (kv_group: a multiple of the "
        "query heads per kv group; query_head: of the kv groups)"
    )
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: the same share in every layer; global: every layer keeps its best "
        "unit, the rest of the budget goes to the best scores of all layers"
    )
    normalize: Literal["auto", "layer_mean", "none"] = Field(
        "auto", description="global scope: divide scores by their layer's mean (layer_mean) or compare them raw "
        "(none); auto: none for taylor (its scores share the loss's units), layer_mean otherwise"
    )
    targets: Regex = Field(".*", description="regex (full match) of the attention modules to prune, e.g. "
                           "model.layers.3.self_attn, transformer.h.3.attn, bert.encoder.layer.3.attention.self")
    exclude: Regex | None = Field(None, description="regex (full match) of attention modules to leave as they are")
    layers: BlockIndices = None
    calibration_tokens: int = Field(2048, ge=16, description="tokens (from data:) for output_norm / taylor")

    @model_validator(mode="after")
    def _one_budget(self) -> PruneHeadsConfig:
        if self.keep is not None and self.heads_per_layer is not None:
            raise ValueError("set keep (share of heads) or heads_per_layer, not both")
        if self.heads_per_layer is not None and self.scope == "global":
            raise ValueError("heads_per_layer fixes every layer's count; use keep with scope: global")
        return self
