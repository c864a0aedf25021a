"""The distill pass's settings, torch-free (validate reads them); the pass: passes/distill.py."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt

from llmshrink.fields import AsTuple
from llmshrink.passes.base import TrainingConfig
from llmshrink.registry import register_pass


@register_pass("distill")
class DistillConfig(TrainingConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weighs CE")
    temperature: float = Field(2.0, gt=0.0)
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl"] = Field(
        "forward_kl",
        description="the KD divergence, p = teacher, q = student: forward_kl KL(p||q) (Hinton); reverse_kl "
        "KL(q||p) (MiniLLM); jsd, generalized JSD with jsd_beta (GKD); skew_kl KL(p||skew·p+(1-skew)·q) and "
        "skew_rkl KL(q||(1-skew)·p+skew·q) (DistiLLM)",
    )
    skew: float = Field(0.1, gt=0.0, lt=1.0, description="skew_kl / skew_rkl: share of the KL's first "
                        "distribution mixed into its second (DistiLLM's alpha)")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="jsd: teacher weight beta in the mixture "
                            "m = beta·p + (1-beta)·q; 0.5 = symmetric JSD")
    train: Literal["all", "compressed"] = Field(
        "all", description="all trainable parameters, or only those of llmshrink's compressed layers"
    )
    teacher: str = Field("base", description="'base' = the model as loaded, or a model id to load")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state term, added to the alpha mix")
    hidden_loss: Literal["mse", "cosine"] = "mse"
    attention_weight: float = Field(0.0, ge=0.0, description="weight of the attention-map KL term (TinyBERT)")
    layer_map: list[Annotated[tuple[NonNegativeInt, NonNegativeInt], AsTuple]] | None = Field(
        None,
        description="student -> teacher hidden-state index pairs (0 = embeddings, i = after block i); "
        "default: spread evenly, last to last",
    )
    eval_every: int = Field(
        0, ge=0, description="perplexity every N steps (and before and after training) on data.heldout "
        "documents, or on the recipe's evaluate data when data.heldout is 0; 0 = off",
    )
    eval_tokens: int = Field(4096, ge=16, description="held-out tokens per periodic evaluation")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast (accelerate); fp16 needs CUDA")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
