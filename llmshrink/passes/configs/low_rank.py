"""The low_rank pass's settings, torch-free (validate reads them); the pass: passes/low_rank.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import BlockIndices, Exclude, Regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass

EMBEDDING_TARGETS = r".*word_embeddings|.*embed_tokens|.*wte"  # BERT, Llama-style, GPT-2 word tables


@register_pass("low_rank")
class LowRankConfig(PassConfig):
    targets: Regex | None = Field(
        r".*\.\d+\..*",
        description="regex over full module names (Linear or Conv1D); default: every block layer; null: none "
        "(with embeddings: true, only the embeddings)",
    )
    exclude: Exclude = None
    layers: BlockIndices = None
    rank: int | None = Field(None, ge=1, description="the same rank for every target")
    energy: float | None = Field(
        None, gt=0.0, le=1.0,
        description="per layer, the smallest rank whose singular values (of W, or W·S when activation_aware) "
        "hold this share of the squared norm",
    )
    ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="factorised / dense params per layer: rank = floor(ratio·m·n/(m+n))"
    )
    activation_aware: bool = Field(
        False, description="whiten by calibration inputs so the SVD minimises the output error, not the weight error"
    )
    calibration_tokens: int = Field(2048, ge=16, description="tokens of data: for activation_aware")
    damping: float = Field(1e-4, gt=0.0, description="XXᵀ + damping·mean(diag)·I before Cholesky (x10 on failure)")
    randomized: bool = Field(False, description="torch.svd_lowrank instead of a full SVD (faster, approximate)")
    oversample: int = Field(10, ge=0, description="extra columns of the randomized sketch")
    power_iters: int = Field(2, ge=0, description="subspace iterations of the randomized SVD")
    embeddings: bool = Field(
        False, description="also factorise nn.Embedding tables matching embedding_targets (ALBERT style), with the "
        "same rank rule; always by plain (or randomized) SVD: activation_aware applies to Linear layers only",
    )
    embedding_targets: Regex = Field(
        EMBEDDING_TARGETS, description="regex over full nn.Embedding names, for embeddings: true (exclude applies, "
        "layers does not)",
    )
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> LowRankConfig:
        given = [key for key in ("rank", "energy", "ratio") if getattr(self, key) is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise PydanticCustomError(
                "rank_rule", "give exactly one of rank, energy or ratio (found {found})", {"found": found}
            )
        if self.targets is None and not self.embeddings:
            raise PydanticCustomError(
                "no_targets", "targets: null leaves nothing to factorise; give a regex or set embeddings: true", {}
            )
        return self

    def rule(self) -> dict:
        key = next(key for key in ("rank", "energy", "ratio") if getattr(self, key) is not None)
        return {key: getattr(self, key)}
