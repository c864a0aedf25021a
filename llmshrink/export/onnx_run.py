"""Running an exported ONNX model (llmshrink/export/onnx.py) in onnxruntime, on CPU: for the export's checks and for
benchmarks.

    OnnxModel(path)        one call runs a prefill (no past) or a decode step (the present tensors of the last call)
    greedy                 greedy tokens with the KV cache (no stop at EOS)
    onnx_perplexity        exp(mean NLL) in onnxruntime, in llmshrink.eval.perplexity's windows (same protocol)
    decode_speed           prefill ms and decode tokens/s with the KV cache (batch 1)

Without onnxruntime: one line naming what to install (require_runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.latency import greedy_speed
from llmshrink.eval.perplexity import PerplexityResult, runtime_perplexity
from llmshrink.export.staging import INSTALL, THREADS

FORMAT = "onnx"
MODEL_FILE = "model.onnx"
PAST = "past_key_values."


def require_runtime(packages: tuple[str, ...] = ("onnx", "onnxscript", "onnxruntime")) -> None:
    """One line naming what to install when one of `packages` (default: what the export needs) is missing."""
    missing = [name for name in packages if not _importable(name)]
    if missing:
        raise LlmshrinkError(f"{FORMAT}: the export needs {', '.join(missing)}, not installed: {INSTALL}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


class OnnxModel:
    """An exported model in an onnxruntime session (CPU, `threads` threads)."""

    def __init__(self, path: str | Path, threads: int = THREADS):
        require_runtime(("onnxruntime",))
        import onnxruntime as ort

        path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path / MODEL_FILE if path.is_dir() else path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Per block: (kv heads, head size) of its past, as the graph fixes them.
        self.past = [tuple(i.shape[1::2]) for i in self.session.get_inputs() if i.name.endswith(".key")]

    @property
    def is_decoder(self) -> bool:
        return bool(self.past)

    def __call__(self, ids: np.ndarray, mask: np.ndarray | None = None,
                 past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of `ids` (batch, new tokens) after `past` (present tensors of the last call; None: none), and
        the present tensors to pass next. `mask`: 1/0 over past + new tokens (default all 1)."""
        ids = np.asarray(ids, dtype=np.int64)
        batch, length = ids.shape
        past_len = past[0].shape[2] if past else 0
        mask = np.ones((batch, past_len + length), np.int64) if mask is None else np.asarray(mask, np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if not self.is_decoder:
            feeds["token_type_ids"] = np.zeros_like(ids)
            return self.session.run(None, feeds)[0], []
        feeds["position_ids"] = np.clip(mask.cumsum(-1) - 1, 0, None)[:, past_len:]
        if past is None:
            past = [np.zeros((batch, heads, 0, size), np.float32) for heads, size in self.past for _ in "kv"]
        feeds.update(zip([n for n in self.input_names if n.startswith(PAST)], past, strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self(ids)[0]).float()


def greedy(model: OnnxModel, prompt: list[int] | np.ndarray, new_tokens: int) -> list[int]:
    """`new_tokens` tokens picked greedily after `prompt`, with the KV cache (no stop at EOS)."""
    logits, past = model(np.asarray(prompt, np.int64).reshape(1, -1))
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits, past = model(np.array([[tokens[-1]]]), past=past)
    return tokens


def onnx_perplexity(model: OnnxModel | str | Path, token_ids: torch.Tensor | np.ndarray, window: int, stride: int,
                    bos_token_id: int | None = None) -> PerplexityResult:
    """exp(mean NLL) of `token_ids` (1-D) in onnxruntime, windowed exactly as llmshrink.eval.perplexity does."""
    model = model if isinstance(model, OnnxModel) else OnnxModel(model)
    if not model.is_decoder:
        raise LlmshrinkError(f"{FORMAT}: perplexity needs a decoder (causal LM); this ONNX model is an encoder")
    return runtime_perplexity(lambda row: torch.from_numpy(model(np.asarray(row, dtype=np.int64)[None])[0][0]),
                              torch.as_tensor(np.asarray(token_ids)), window, stride, bos_token_id, "onnxruntime")


def decode_speed(model: OnnxModel | str | Path, prompt: list[int] | np.ndarray, new_tokens: int = 64,
                 repeats: int = 3) -> dict:
    """Prefill ms of `prompt` and greedy decode tokens/s with the KV cache (batch 1), by eval.latency.greedy_speed."""
    model = model if isinstance(model, OnnxModel) else OnnxModel(model)
    state: dict[str, list[np.ndarray]] = {}

    def run(ids: list[int], past: list[np.ndarray] | None) -> np.ndarray:
        logits, state["past"] = model(np.array([ids], np.int64), past=past)
        return logits[0, -1]

    return greedy_speed(lambda ids: run(ids, None), lambda token: run([token], state["past"]),
                        np.asarray(prompt, np.int64).reshape(-1).tolist(), new_tokens, repeats)
