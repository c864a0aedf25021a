"""What passes share: the teacher, tokenizer, training data, device and a log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llmshrink.specs import DataSpec, MixDataSpec, TeacherDataSpec


@dataclass
class Context:
    tokenizer: object  # a transformers tokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: nn.Module | None = None  # frozen copy of the model as loaded, before any pass
    data: DataSpec | TeacherDataSpec | MixDataSpec | None = None  # the recipe's `data:` section (training text)
    seed: int = 0
    log: Callable[[str], None] = print
    work_dir: Path | None = None  # this stage's own folder for resumable state (set by the engine)
    # The recipe's evaluation perplexity (model -> float), when the engine measures it between stages;
    # passes with steps of their own (iterate, periodic eval in distill) report with it.
    evaluate: Callable[[nn.Module], float] | None = None
    # Where teacher samples (data: {source: teacher | mix}) are cached, and what names the teacher in their key.
    samples_dir: Path | None = None
    teacher_fingerprint: str = ""
    _token_cache: dict = field(default_factory=dict, repr=False)

    def train_token_ids(self) -> torch.Tensor:
        """1-D token ids of the recipe's `data:` section, loaded once and shared by all passes."""
        return self._token_ids("train")

    def heldout_token_ids(self) -> torch.Tensor:
        """1-D token ids of the documents `data.heldout` keeps out of training, for evaluation during training."""
        return self._token_ids("heldout")

    def _token_ids(self, part: Literal["train", "heldout"]) -> torch.Tensor:
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
