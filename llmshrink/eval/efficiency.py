"""Size, speed and memory of a model: what the final `apply` table compares, base against compressed."""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import torch
from safetensors.torch import save_file
from torch import nn

T = TypeVar("T")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys hold the same numbers (tied / shared weights), so count them once."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.data_ptr(), tuple(t.shape), t.dtype)


def _unique_params(model: nn.Module) -> dict[tuple, torch.Tensor]:
    unique: dict[tuple, torch.Tensor] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        unique.setdefault(_storage_key(p), p)
    return unique


def _weights(p: torch.Tensor) -> int:
    """Weights a parameter holds: a bitsandbytes 4-bit one packs two per byte and keeps its shape aside."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def count_params(model: nn.Module) -> int:
    """Number of unique parameters: tied or shared weights count once; buffers do not count."""
    return sum(_weights(p) for p in _unique_params(model).values())


def count_bytes(model: nn.Module) -> int:
    """Bytes of the tensor data a checkpoint stores: the state dict (parameters, persistent buffers, and what
    bitsandbytes layers add, e.g. 4-bit absmax and quant maps), each shared tensor once."""
    unique: dict[tuple, torch.Tensor] = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            unique.setdefault(_storage_key(t), t)
    return sum(t.numel() * t.element_size() for t in unique.values())


def has_tied_embeddings(model: nn.Module) -> bool:
    """True when the output projection shares its weight with the input embedding."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return False
    return _storage_key(emb.weight) == _storage_key(head.weight)


def dir_size(path: str | os.PathLike, weights_only: bool = False) -> int:
    """Bytes of the files under a checkpoint directory (only *.safetensors / *.bin if weights_only).

    Follows symlinks, so a hub cache snapshot (links into blobs/) reports the real size.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if weights_only and not name.endswith(WEIGHT_SUFFIXES):
                continue
            total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def safetensors_bytes(model: nn.Module) -> int:
    """Size of the model's state dict written as one .safetensors file (tied weights once).

    A fair 'size on disk' for a model that has not been saved yet; the temporary file is deleted.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    storages: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; views of one storage are copied apart.
        storage = (t.untyped_storage().data_ptr(), t.device.type)
        if storage in storages:
            t = t.clone()
        storages.add(storage)
        tensors[name] = t
    with tempfile.TemporaryDirectory(prefix="llmshrink-size-") as tmp:
        file = os.path.join(tmp, "model.safetensors")
        save_file(tensors, file, metadata={"format": "pt"})
        return os.path.getsize(file)


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    try:
        import resource  # POSIX only
    except ImportError:
        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / (1024 * 1024)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _vocab_size(model: nn.Module, tokenizer_or_vocab_size) -> int:
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size
    else:
        vocab = len(tokenizer_or_vocab_size)
    # A tokenizer may know more tokens than the embedding holds; stay inside both.
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return min(vocab, model_vocab) if isinstance(model_vocab, int) else vocab


def _pad_token_id(model: nn.Module, tokenizer_or_vocab_size) -> int:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    prefill_ms: one forward over the prompt. decode_ms_per_token: (generate - prefill) / new_tokens,
    generate running greedy with the KV cache and exactly `new_tokens` new tokens.
    tokens_per_s: batch_size * new_tokens / generate time.
    """
    if prompt_tokens < 1 or new_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("prompt_tokens, new_tokens, batch_size and repeats must all be >= 1")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model, tokenizer_or_vocab_size)
    input_ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    gen_kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": _pad_token_id(model, tokenizer_or_vocab_size),
    }

    was_training = model.training
    model.eval()
    prefill_s: list[float] = []
    generate_s: list[float] = []
    try:
        for i in range(warmup + repeats):
            _sync(device)
            with timed() as t_prefill:
                model(input_ids=input_ids, attention_mask=attention_mask)
                _sync(device)
            with timed() as t_generate:
                out = model.generate(input_ids, **gen_kwargs)
                _sync(device)
            if out.shape[1] != prompt_tokens + new_tokens:
                raise RuntimeError(
                    f"generate made {out.shape[1] - prompt_tokens} tokens, asked for {new_tokens}"
                )
            if i >= warmup:
                prefill_s.append(t_prefill.seconds)
                generate_s.append(t_generate.seconds)
    finally:
        model.train(was_training)

    prefill = statistics.median(prefill_s)
    generate = statistics.median(generate_s)
    return {
        "prefill_ms": prefill * 1000,
        "decode_ms_per_token": (generate - prefill) * 1000 / new_tokens,
        "tokens_per_s": batch_size * new_tokens / generate,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
    }
