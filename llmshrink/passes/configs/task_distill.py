"""The task_distill pass's settings, torch-free (validate reads them); the pass: passes/task_distill.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.passes.base import TrainingConfig
from llmshrink.passes.configs.finetune import refuse_seq_len
from llmshrink.registry import register_pass


@register_pass("task_distill")
class TaskDistillConfig(TrainingConfig):
    text: Literal["task", "data"] = Field(
        "task", description="what the student learns on: task = the task's train split (task distillation); data "
        "= unlabeled text of the recipe's data: section, cut into max_length pieces (TinyBERT's general "
        "distillation: no labels, so label_weight must be 0)",
    )
    batch_size: int = Field(16, ge=1, description="examples per micro-batch (per process)")
    lr: float = Field(5e-5, gt=0.0)
    max_length: int = Field(128, ge=2, description="tokens per text (a pair: both together); longer ones are cut")
    temperature: float = Field(1.0, gt=0.0, description="softens both class distributions (TinyBERT: 1)")
    prediction_weight: float = Field(
        1.0, ge=0.0, description="classifiers: KL(teacher || student) of the class distributions at temperature",
    )
    embedding_weight: float = Field(
        1.0, ge=0.0, description="bare encoders (embedding models): MSE between the mean-pooled sentence embeddings",
    )
    hidden_weight: float = Field(
        1.0, ge=0.0, description="MSE of the embeddings and of each student layer m against teacher layer "
        "m·N/M (TinyBERT's uniform map), mean over the pairs; a learned projection bridges other widths",
    )
    attention_weight: float = Field(
        0.0, ge=0.0, description="MSE of the attention probabilities of the mapped layers, mean over them "
        "(TinyBERT: 1); needs equal head counts, so not after prune_heads",
    )
    label_weight: float = Field(0.0, ge=0.0, description="classifiers: cross-entropy with the gold labels")
    student_dropout: bool = Field(
        False, description="train the student with its dropout on (TinyBERT's code does); off, it fits the "
        "teacher's eval-mode outputs without noise (on tiny BERTs: a far lower hidden-state loss)",
    )

    _no_seq_len = field_validator("seq_len")(refuse_seq_len)

    @field_validator("label_weight")
    @classmethod
    def _labels_to_learn(cls, weight: float, info: ValidationInfo) -> float:
        if weight > 0 and info.data.get("text") == "data":
            raise PydanticCustomError("unlabeled", "text: data is unlabeled text; set it to 0")
        return weight
