"""llama.cpp, through llama-cpp-python, for the GGUF export and its measurements (the optional `export` extra).

    quantize(source, out, ftype)        llama.cpp's own quantizer (what llama-quantize runs) from an f32 GGUF
    open_gguf(path, n_ctx)              a llama_cpp.Llama on THREADS threads (all positions' logits by default)
    gguf_logits(path, ids)              (sequences, tokens, vocab) logits computed by llama.cpp
    gguf_tokenize(path, text)           llama.cpp's token ids of a text (the file's own tokenizer)
    gguf_perplexity(path, ids, ...)     perplexity in llama.cpp, by llmshrink.eval.perplexity's window protocol
    gguf_decode_speed(path, prompt)     prefill ms and greedy decode tokens/s in llama.cpp (f16 KV cache, as deployed)
    tensor_types(path)                  how many tensors of each type a GGUF holds

llama.cpp's log is collected instead of printed (llama-cpp-python 0.3.36 prints llama.cpp's warnings even with
verbose=False); its last error line goes into the one-line error when loading or quantizing fails.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.latency import greedy_speed
from llmshrink.eval.perplexity import PerplexityResult, runtime_perplexity
from llmshrink.export.staging import INSTALL, THREADS

MISSING = ("gguf: the GGUF export writes and checks the file with llama.cpp through llama-cpp-python, which is not "
           f"installed: {INSTALL}")


def llama_cpp_module() -> Any:
    """llama_cpp, or the one line saying what to install."""
    try:
        import llama_cpp
    except ImportError:
        raise LlmshrinkError(MISSING) from None
    return llama_cpp


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Within: llama.cpp's log lines are collected rather than printed; llama-cpp-python's handler is set back after."""
    llama_cpp = llama_cpp_module()
    from llama_cpp import _logger

    lines: list[str] = []
    collect = llama_cpp.llama_log_callback(lambda level, text, data: lines.append(text.decode(errors="replace")))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _last_error(lines: list[str]) -> str:
    found = [line.strip() for line in lines if "error" in line.lower() or "fail" in line.lower()]
    return found[-1] if found else "llama.cpp logged no reason"


def quantize(source: Path, out: Path, ftype: gguf.LlamaFileType) -> None:
    """out: the f32 GGUF `source` quantized by llama.cpp to file type `ftype` (its default per-tensor choices)."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = THREADS
    with _llama_log() as lines:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise LlmshrinkError(f"gguf: llama.cpp's quantizer failed to make {ftype.name}: {_last_error(lines)}")


def open_gguf(path: str | Path, n_ctx: int, f32_cache: bool = True, vocab_only: bool = False,
              logits_all: bool = True) -> Any:
    """A llama_cpp.Llama on THREADS threads (close it). `f32_cache`: keys and values kept in f32 (comparisons that
    see the file's weights only) rather than llama.cpp's default f16 (what a deployment runs); `logits_all`: keep
    every position's logits (comparisons, perplexity) rather than the last one's (timing generation)."""
    llama_cpp = llama_cpp_module()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    with _llama_log() as lines:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=THREADS,
                                   n_threads_batch=THREADS, logits_all=logits_all, vocab_only=vocab_only, verbose=False,
                                   **cache)
        except ValueError:  # llama-cpp-python says "Failed to load model from file"; llama.cpp's log says why
            raise LlmshrinkError(f"gguf: llama.cpp cannot load {path}: {_last_error(lines)}") from None


def _run(llm: Any, row: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(row)
    return torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))


def gguf_logits(path: str | Path, ids: torch.Tensor, f32_cache: bool = True) -> torch.Tensor:
    """(sequences, tokens, vocab) logits of `ids` (sequences, tokens) computed by llama.cpp, one sequence at a time."""
    llm = open_gguf(path, n_ctx=int(ids.shape[-1]), f32_cache=f32_cache)
    try:
        return torch.stack([_run(llm, row) for row in ids.tolist()])
    finally:
        llm.close()


def gguf_tokenize(path: str | Path, text: str) -> list[int]:
    """llama.cpp's ids of `text` (no BOS added, special-token text not parsed) by the tokenizer the file carries."""
    llm = open_gguf(path, n_ctx=8, vocab_only=True)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    finally:
        llm.close()


def gguf_perplexity(path: str | Path, token_ids: torch.Tensor, window: int, stride: int,
                    bos_token_id: int | None = None, f32_cache: bool = False) -> PerplexityResult:
    """exp(mean NLL) of `token_ids` (1-D) in llama.cpp, by the same windows and BOS handling as
    llmshrink.eval.perplexity.perplexity, so the two numbers compare; llama.cpp's context is one window."""
    llm = open_gguf(path, n_ctx=window, f32_cache=f32_cache)
    try:
        return runtime_perplexity(lambda row: _run(llm, row), token_ids, window, stride, bos_token_id, "llama.cpp")
    finally:
        llm.close()


def gguf_decode_speed(path: str | Path, prompt: list[int], new_tokens: int = 64, repeats: int = 3) -> dict:
    """Prefill ms of `prompt` and greedy decode tokens/s (batch 1) in llama.cpp as a deployment runs it: llama.cpp's
    f16 KV cache, only the last position's logits; by eval.latency.greedy_speed, the protocol of every runtime."""
    llama_cpp = llama_cpp_module()
    llm = open_gguf(path, n_ctx=len(prompt) + new_tokens, f32_cache=False, logits_all=False)
    vocab = llm.n_vocab()

    def run(ids: list[int]) -> np.ndarray:
        llm.eval(ids)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def prefill(ids: list[int]) -> np.ndarray:
        llm.reset()
        return run(ids)

    try:
        return greedy_speed(prefill, lambda token: run([token]), list(prompt), new_tokens, repeats)
    finally:
        llm.close()


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each type the file holds (llama.cpp keeps norms in f32, and puts a tensor whose rows do
    not fit the requested type's block in another type)."""
    return dict(sorted(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors).items()))
