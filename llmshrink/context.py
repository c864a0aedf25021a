"""What passes share: the teacher, tokenizer, training data, device and a log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmshrink.specs import DataSpec


@dataclass
class Context:
    tokenizer: object  # a transformers tokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: nn.Module | None = None  # frozen copy of the model as loaded, before any pass
    data: DataSpec | None = None  # the recipe's `data:` section (training / calibration text)
    seed: int = 0
    log: Callable[[str], None] = print
    work_dir: Path | None = None  # this stage's own folder for resumable state (set by the engine)
    _token_cache: dict = field(default_factory=dict, repr=False)

    def train_token_ids(self) -> torch.Tensor:
        """1-D token ids of the recipe's `data:` section, loaded once and shared by all passes."""
        if self.data is None:
            from llmshrink.errors import LlmshrinkError

            raise LlmshrinkError("this pass needs training text: add a `data:` section to the recipe")
        if self.data not in self._token_cache:
            from llmshrink.distill.data import token_ids

            self._token_cache[self.data] = token_ids(self.data, self.tokenizer)
        return self._token_cache[self.data]
