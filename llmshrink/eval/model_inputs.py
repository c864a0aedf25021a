"""Inputs for measuring a model: seeded random token ids on the model's device, the id to pad with, and the name its
forward gives the KV cache."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from llmshrink.errors import LlmshrinkError


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def random_ids(model: nn.Module, batch_size: int, length: int, seed: int) -> torch.Tensor:
    """(batch_size, length) token ids drawn from the config's vocab_size (seeded), on the model's device."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise LlmshrinkError(f"{type(model).__name__}: config has no vocab_size to draw token ids from")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, length), generator=generator).to(model_device(model))


def pad_token_id(model: nn.Module, tokenizer_or_vocab_size) -> int:
    """The pad (else eos) token id of the tokenizer, the generation config or the config; 0 if none has one."""
    for source in (
        tokenizer_or_vocab_size,
        getattr(model, "generation_config", None),
        getattr(model, "config", None),
    ):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


def cache_name(model: nn.Module) -> str:
    """The forward's name of the KV cache: `cache` from transformers 5.25 (`past_key_values` before, deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
