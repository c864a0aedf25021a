"""The recipe's `target:` and `search:` sections, torch-free (validate reads them).

    target: {params: 0.7}              # or bytes: 0.3, macs: 0.6; a share of the base (<= 1) or an absolute count
    search:                            # the decisions the planner may take, each per block
      drop_layers: true                # remove the whole block
      prune_ffn: [0.75, 0.5, 0.25]     # FFN neuron shares a block may keep
      prune_heads: [0.67, 0.34]        # head shares a block may keep (rounded down to whole kv groups)
      low_rank: [0.5, 0.25]            # factorised / dense params of a block's MLP or attention layers
      quantize: [int8-dynamic, bnb-nf4]  # formats of a whole block (bytes targets only)
      embeddings: true                 # the embedding table (and lm_head) may be stored in int8 (bytes targets)
      score: kl                        # a decision's cost: KL from the base (kl) or the text's NLL (nll)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import AsTuple
from llmshrink.specs import Spec

# What a budget counts. Each is measured exactly on the model: unique parameters, the checkpoint's tensor bytes,
# multiply-accumulates of one forward over MACS_SEQ_LEN tokens; decode_speedup divides the MACs of one decode step
# (a token after MACS_SEQ_LEN cached ones, fewer where the model's positions end): batch-1 decoding reads every
# weight once per token, so its speed on a CPU follows them (the timed speed is evaluate.latency's, beside the
# base's).
TARGET_KINDS = ("params", "bytes", "macs", "decode_speedup")
UNITS = {"params": "params", "bytes": "bytes", "macs": "macs", "decode_speedup": "decode_macs"}  # what each counts
QUANTIZE_FORMATS = ("int8-dynamic", "bnb-nf4", "bnb-fp4", "bnb-int8")
BNB_FORMATS = ("bnb-nf4", "bnb-fp4", "bnb-int8")
MACS_SEQ_LEN = 128
SCORE_NAMES = {"kl": "KL from the base", "nll": "NLL"}  # what a decision's measured loss is, by search.score

Shares = Annotated[tuple[float, ...], AsTuple]
Formats = Annotated[tuple[str, ...], AsTuple]


class TargetSpec(Spec):
    """One budget: the model after planning holds at most this much. Up to 1: a share of the base; above 1: an
    absolute count (parameters, bytes, MACs of a forward over 128 tokens). decode_speedup: how many times fewer
    decode-step MACs than the base's (>= 1)."""

    params: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    bytes: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    macs: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    decode_speedup: float | None = Field(None, ge=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_budget(self) -> TargetSpec:
        given = [kind for kind in TARGET_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise PydanticCustomError("one_budget", "give exactly one of {kinds} (found {found})",
                                      {"kinds": ", ".join(TARGET_KINDS), "found": found})
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in TARGET_KINDS if getattr(self, kind) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)

    @property
    def unit(self) -> str:
        """What the budget counts on the model (a Measured field)."""
        return UNITS[self.kind]

    def limit(self, base: int) -> int:
        """The most the planned model may hold, in the unit's count, given the base's count."""
        value = self.value
        if self.kind == "decode_speedup":
            return int(base / value)
        return int(value * base) if value <= 1 else int(value)


class SearchSpec(Spec):
    """The candidate decisions, each taken per block (an empty list: not searched)."""

    drop_layers: bool = Field(True, description="a block may be removed whole")
    prune_ffn: Shares = Field((0.75, 0.5, 0.25), description="FFN neuron shares a block may keep")
    prune_heads: Shares = Field((0.67, 0.34), description="query head shares a block may keep (rounded down to "
                                "whole kv groups)")
    low_rank: Shares = Field((), description="factorised / dense params a block's MLP or attention layers may get "
                             "(activation-aware SVD)")
    quantize: Formats = Field(("int8-dynamic", "bnb-nf4"), description="formats a whole block may be stored in "
                              "(bytes targets; at most one bitsandbytes format)")
    embeddings: bool = Field(True, description="bytes targets: the embedding tables and the lm_head may be stored in "
                             "int8 (one decision; a tied lm_head gets its own int8 copy)")
    score: Literal["kl", "nll"] = Field("kl", description="a decision's measured cost: the mean KL(base || model) "
                                        "per token, or the mean NLL of the calibration text")
    calibration_tokens: int = Field(2048, ge=64, description="tokens of data: each decision is measured on (spread "
                                    "over the whole training text) and its pass calibrates on")

    @field_validator("prune_ffn", "prune_heads", "low_rank")
    @classmethod
    def _shares(cls, shares: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < share < 1.0 for share in shares) or len(set(shares)) != len(shares):
            raise PydanticCustomError("share", "shares are in (0, 1), each given once")
        return shares

    @field_validator("quantize")
    @classmethod
    def _formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [fmt for fmt in formats if fmt not in QUANTIZE_FORMATS]
        if unknown:
            raise PydanticCustomError("format", "'{fmt}' is not a format; allowed: {allowed}",
                                      {"fmt": unknown[0], "allowed": ", ".join(QUANTIZE_FORMATS)})
        bnb = [fmt for fmt in formats if fmt in BNB_FORMATS]
        if len(bnb) > 1:
            raise PydanticCustomError("format", "at most one bitsandbytes format, not {both} (a checkpoint's "
                                      "quantization_config describes one)", {"both": " and ".join(bnb)})
        return formats


def check_planning(target: TargetSpec | None, search: SearchSpec | None, causal_lm: bool) -> tuple[str, str] | None:
    """(field, message) of what is wrong with a recipe's target:/search: pair, or None."""
    if target is None:
        return ("search", "only with a target: section (the budget the search plans for)") if search else None
    if not causal_lm:
        return "target", "plans by calibration perplexity: causal LMs only (model.task causal_lm)"
    search = search or SearchSpec()
    for name in ("quantize", "embeddings"):
        if target.kind != "bytes" and getattr(search, name) and name in search.model_fields_set:
            return f"search.{name}", f"formats change bytes, not {target.kind}; remove it (or plan for bytes)"
    offered = [name for name in ("prune_ffn", "prune_heads", "low_rank") if getattr(search, name)]
    if not (search.drop_layers or offered or (target.kind == "bytes" and (search.quantize or search.embeddings))):
        return "search", "offers no decision; allow drop_layers or give shares to prune_ffn, prune_heads or low_rank"
    return None
