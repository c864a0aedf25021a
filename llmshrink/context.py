"""What passes share: the teacher, tokenizer, training data, device and a log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llmshrink.specs import DataSpec, MixDataSpec, TeacherDataSpec
from llmshrink.task_data import Example, TaskSpec


@dataclass
class Context:
    tokenizer: object  # a transformers tokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Frozen copy of the model as loaded, before any pass; a pass that fine-tunes the model on its task
    # (finetune) replaces it with a frozen copy of the fine-tuned model, which later passes distil from.
    teacher: nn.Module | None = None
    data: DataSpec | TeacherDataSpec | MixDataSpec | None = None  # the recipe's `data:` section (training text)
    seed: int = 0
    log: Callable[[str], None] = print
    work_dir: Path | None = None  # this stage's own folder for resumable state (set by the engine)
    # The recipe's quality measure (model -> float: perplexity, or an encoder's task metric), when the engine
    # measures it between stages;
    # passes with steps of their own (iterate, periodic eval in distill) report with it.
    evaluate: Callable[[nn.Module], float] | None = None
    evaluate_name: str = "perplexity"  # what `evaluate` measures: perplexity, or an encoder's task metric
    # Where teacher samples (data: {source: teacher | mix}) are cached, and what names the teacher in their key.
    samples_dir: Path | None = None
    teacher_fingerprint: str = ""
    task: TaskSpec | None = None  # encoders: the recipe's `task:` section
    # loaded once: token ids by (data: or task: section, part); the task's examples by (task: section, split)
    _token_cache: dict = field(default_factory=dict, repr=False)
    _examples_cache: dict = field(default_factory=dict, repr=False)

    def _task_token_ids(self) -> torch.Tensor:
        """An encoder's calibration text without a `data:` section: its task's training texts, one after another
        (what it will see; passes that calibrate on a token stream cut it into windows)."""
        key = (self.task, "tokens")
        if key not in self._token_cache:
            texts = [t for ex in self.task_examples("train") for t in (ex.text, ex.text_pair) if t]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            self._token_cache[key] = torch.tensor([t for row in ids for t in row], dtype=torch.long)
        return self._token_cache[key]

    def task_examples(self, split: str = "train") -> list[Example]:
        """The `task:` examples of one split (train for fine-tuning and distillation), loaded once."""
        from llmshrink.errors import LlmshrinkError
        from llmshrink.task_data import load_examples

        if self.task is None:
            raise LlmshrinkError("this pass needs labeled examples: add a `task:` section to the recipe")
        key = (self.task, split)
        if key not in self._examples_cache:
            self._examples_cache[key] = load_examples(self.task, split)
        return self._examples_cache[key]

    def train_token_ids(self) -> torch.Tensor:
        """1-D token ids of the recipe's `data:` section, loaded once and shared by all passes."""
        return self._token_ids("train")

    def heldout_token_ids(self) -> torch.Tensor:
        """1-D token ids of the documents `data.heldout` keeps out of training, for evaluation during training."""
        return self._token_ids("heldout")

    def _token_ids(self, part: Literal["train", "heldout"]) -> torch.Tensor:
        if self.data is None and self.task is not None and part == "train":
            return self._task_token_ids()
        if self.data is None:
            from llmshrink.errors import LlmshrinkError

            need = "training text" if part == "train" else "held-out text (data.heldout > 0)"
            raise LlmshrinkError(f"this pass needs {need}: add a `data:` section to the recipe")
        key = (self.data, part)
        if key not in self._token_cache:
            from llmshrink.distill.teacher_data import training_token_ids

            self._token_cache[key] = training_token_ids(self.data, self.tokenizer, part, self.teacher,
                                                        cache_dir=self.samples_dir,
                                                        fingerprint=self.teacher_fingerprint)
        return self._token_cache[key]
