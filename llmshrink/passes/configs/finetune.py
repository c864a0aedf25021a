"""The finetune pass's settings, torch-free (validate reads them); the pass: passes/finetune.py."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.passes.base import TrainingConfig
from llmshrink.registry import register_pass


def refuse_seq_len(cls, value: Any) -> Any:
    """TrainingConfig's seq_len (tokens per packed block) means nothing for labeled texts: refuse it when given,
    rather than ignore it (shared by the task passes' configs)."""
    raise PydanticCustomError("unused_field", "not used by this pass: texts are cut at max_length")


@register_pass("finetune")
class FinetuneConfig(TrainingConfig):
    batch_size: int = Field(16, ge=1, description="examples per micro-batch (per process)")
    lr: float = Field(5e-5, gt=0.0, description="BERT fine-tuning's usual range is 2e-5 to 5e-5")
    max_length: int = Field(128, ge=2, description="tokens per text (a pair: both together); longer ones are cut")
    max_score: float = Field(
        5.0, gt=0.0, description="similarity: the score of identical texts; the cosine is trained towards "
        "score / max_score (sentence-transformers' CosineSimilarityLoss; 5 for STS-B)",
    )

    _no_seq_len = field_validator("seq_len")(refuse_seq_len)
