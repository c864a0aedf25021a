"""Wall time: a timer, load time, and prefill / decode latency and tokens per second of generate; greedy_speed,
the same protocol for any runtime with a KV cache (PyTorch, llama.cpp, onnxruntime)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from llmshrink.eval.model_inputs import cache_name, pad_token_id

T = TypeVar("T")


@dataclass
class Timer:
    seconds: float = 0.0


@contextmanager
def timed() -> Iterator[Timer]:
    """`with timed() as t: ...` then t.seconds holds the elapsed wall time (perf_counter)."""
    timer = Timer()
    start = time.perf_counter()
    try:
        yield timer
    finally:
        timer.seconds = time.perf_counter() - start


def load_time(fn: Callable[[], T]) -> tuple[T, float]:
    """Call fn() and return (its result, seconds it took)."""
    with timed() as t:
        result = fn()
    return result, t.seconds


def _vocab_size(model: nn.Module, tokenizer_or_vocab_size) -> int:
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size
    else:
        vocab = len(tokenizer_or_vocab_size)
    # A tokenizer may know more tokens than the embedding holds; stay inside both.
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return min(vocab, model_vocab) if isinstance(model_vocab, int) else vocab


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per new token, after that
    token's forward, so the first call ends the prefill and the calls after it time the decode steps."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync_device(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    tokenizer_or_vocab_size,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Prefill and greedy-decode speed on random prompts (seeded), medians over `repeats`.

    prefill_ms: one forward over the prompt (no generate). decode_ms_per_token: one decode step of
    generate (greedy, KV cache), prefill excluded: generate makes new_tokens + 1 tokens, the first from
    the prefill, and the time from that first token to the last is divided by new_tokens.
    tokens_per_s: batch_size * new_tokens / that decode time (prefill excluded).
    """
    from transformers import LogitsProcessorList

    if prompt_tokens < 1 or new_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("prompt_tokens, new_tokens, batch_size and repeats must all be >= 1")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model, tokenizer_or_vocab_size)
    input_ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    made = new_tokens + 1  # the first comes from the prefill
    gen_kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": made,
        "min_new_tokens": made,
        "do_sample": False,
        "pad_token_id": pad_token_id(model, tokenizer_or_vocab_size),
    }

    was_training = model.training
    model.eval()
    prefill_s: list[float] = []
    decode_s: list[float] = []
    try:
        for i in range(warmup + repeats):
            sync_device(device)
            with timed() as t_prefill:
                model(input_ids=input_ids, attention_mask=attention_mask)
                sync_device(device)
            clock = _StepClock(device)
            out = model.generate(input_ids, logits_processor=LogitsProcessorList([clock]), **gen_kwargs)
            if out.shape[1] != prompt_tokens + made or len(clock.times) != made:
                raise RuntimeError(
                    f"generate made {out.shape[1] - prompt_tokens} tokens ({len(clock.times)} steps), asked for {made}"
                )
            if i >= warmup:
                prefill_s.append(t_prefill.seconds)
                decode_s.append(clock.times[-1] - clock.times[0])
    finally:
        model.train(was_training)

    prefill = statistics.median(prefill_s)
    decode = statistics.median(decode_s)
    return {
        "prefill_ms": prefill * 1000,
        "decode_ms_per_token": decode * 1000 / new_tokens,
        "tokens_per_s": batch_size * new_tokens / decode,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
    }


def greedy_speed(prefill: Callable[[list[int]], Any], step: Callable[[int], Any], prompt: list[int],
                 new_tokens: int = 64, repeats: int = 3, warmup: int = 1) -> dict:
    """Prefill ms and greedy decode tokens/s of any runtime with a KV cache, batch 1, one protocol for all of them
    (PyTorch, llama.cpp, onnxruntime): `prefill(prompt)` starts a new sequence and returns the last position's
    logits (1-D, anything with argmax), `step(token)` appends one token and returns its logits. Medians over
    `repeats` timed runs after `warmup` untimed ones; the decode time covers `new_tokens` steps, argmax included.
    "tokens": the greedy tokens (the last run's), to check that runtimes agree."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError("new_tokens and repeats must be >= 1")
    prefill_s: list[float] = []
    decode_s: list[float] = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        logits = prefill(prompt)
        middle = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(logits.argmax()))
            logits = step(tokens[-1])
        end = time.perf_counter()
        if i >= warmup:
            prefill_s.append(middle - start)
            decode_s.append(end - middle)
    decode = statistics.median(decode_s)
    return {"prompt_tokens": len(prompt), "prefill_ms": statistics.median(prefill_s) * 1e3, "new_tokens": new_tokens,
            "decode_tokens_per_s": new_tokens / decode, "repeats": repeats, "tokens": tokens}


def torch_greedy_speed(model: nn.Module, prompt: list[int], new_tokens: int = 64, repeats: int = 3,
                       warmup: int = 1) -> dict:
    """greedy_speed of a transformers causal LM in PyTorch (its own KV cache, forward calls, no generate)."""
    state: dict[str, Any] = {}
    name = cache_name(model)

    @torch.inference_mode()
    def run(ids: list[int], past: Any) -> torch.Tensor:
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **{name: past})
        state["past"] = out[name]
        return out.logits[0, -1]

    was_training = model.training
    model.eval()
    try:
        return greedy_speed(lambda ids: run(ids, None), lambda token: run([token], state["past"]), prompt,
                            new_tokens, repeats, warmup)
    finally:
        model.train(was_training)
