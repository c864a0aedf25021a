"""Sliding-window perplexity, the Hugging Face protocol, with the protocol recorded beside the number.

Windows start every `stride` tokens and hold up to `window` tokens; a window scores only the tokens
the previous window did not score, so every token is predicted once, with up to window - 1 tokens of
context. A token is scored only if the window holds at least one token before it: without BOS the
first token of the text is never scored, and with stride == window neither is the first token of
each window (exactly what the Hugging Face recipe does). With `bos_token_id`, BOS is prepended to
every window and counts against its length (window - 1 text tokens per window), so every token is
scored and the model never sees more than `window` positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmshrink.errors import LlmshrinkError

IGNORE = -100


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int
    protocol: dict = field(default_factory=dict)  # window, stride, tokens, bos


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _windows(n_tokens: int, span: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window, over text positions [begin, end)."""
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span, n_tokens)
        # Without BOS a window's first token has no context inside the window, so it cannot be scored.
        first = max(prev_end, begin if bos else begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _check(model: nn.Module, n_tokens: int, window: int, stride: int, bos: bool) -> None:
    if n_tokens < 2:
        raise LlmshrinkError(f"perplexity needs at least 2 tokens of text, got {n_tokens}")
    if window < 2:
        raise LlmshrinkError(f"perplexity window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise LlmshrinkError(f"perplexity stride must be between 1 and the window ({window}), got {stride}")
    limit = max_positions(model)
    if limit is not None and window > limit:
        raise LlmshrinkError(
            f"perplexity window {window} is longer than the model's {limit} positions; use window <= {limit}"
        )


def runtime_perplexity(logits_of: Callable[[list[int]], torch.Tensor], token_ids: torch.Tensor, window: int,
                       stride: int, bos_token_id: int | None = None, runtime: str = "") -> PerplexityResult:
    """perplexity() of a model that runs outside torch (an exported file in its runtime), by the same windows and
    BOS handling, so the numbers compare: `logits_of(row)` gives the (len(row), vocab) logits of one window."""
    ids = torch.as_tensor(token_ids).reshape(-1).long().cpu()
    bos = bos_token_id is not None
    _check(None, ids.numel(), window, stride, bos)
    total, count = 0.0, 0
    for begin, end, first in _windows(ids.numel(), window - 1 if bos else window, stride, bos):
        row = ([bos_token_id] if bos else []) + ids[begin:end].tolist()
        offset = 1 if bos else 0  # text position p sits at row index p - begin + offset; the logits before predict it
        logits = torch.as_tensor(logits_of(row)).float()
        predicted = logits[first - begin + offset - 1: end - begin + offset - 1]
        total += float(F.cross_entropy(predicted, ids[first:end], reduction="sum"))
        count += end - first
    mean = total / count
    protocol = {"window": window, "stride": stride, "tokens": int(ids.numel()), "bos": bos, "runtime": runtime}
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens_scored=count, protocol=protocol)


def window_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of one forward over `input_ids` (batch x length), without a KV cache."""
    # No KV cache: it would only cost memory, each window is one forward.
    config = getattr(model, "config", None)
    kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.inference_mode()
def _batch_nll(
    model: nn.Module, ids: torch.Tensor, batch: list[tuple[int, int, int]], bos_token_id: int | None, device
) -> tuple[float, int]:
    """Summed NLL and scored-token count of windows of equal length, run as one batch."""
    rows, labels = [], []
    for begin, end, first in batch:
        row = ids[begin:end]
        label = row.clone()
        label[: first - begin] = IGNORE
        if bos_token_id is not None:
            row = torch.cat([row.new_tensor([bos_token_id]), row])
            label = torch.cat([label.new_tensor([IGNORE]), label])
        rows.append(row)
        labels.append(label)
    input_ids = torch.stack(rows).to(device)
    target = torch.stack(labels).to(device)[:, 1:]
    logits = window_logits(model, input_ids)[:, :-1].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return nll.item(), int((target != IGNORE).sum())


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int = 1,
    device="cpu",
    bos_token_id: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) of `token_ids` (1-D) under `model`, by the sliding-window protocol above."""
    ids = torch.as_tensor(token_ids).reshape(-1).long().cpu()
    bos = bos_token_id is not None
    _check(model, ids.numel(), window, stride, bos)
    span = window - 1 if bos else window
    windows = _windows(ids.numel(), span, stride, bos)
    # Batch windows of equal length; a last, shorter window runs alone.
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and _length(batches[-1][0]) == _length(w):
            batches[-1].append(w)
        else:
            batches.append([w])

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            nll, n = _batch_nll(model, ids, batch, bos_token_id, device)
            total, count = total + nll, count + n
    finally:
        model.train(was_training)

    mean = total / count
    protocol = {"window": window, "stride": stride, "tokens": int(ids.numel()), "bos": bos}
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens_scored=count, protocol=protocol)


def _length(w: tuple[int, int, int]) -> int:
    return w[1] - w[0]
