"""Multiply-accumulates (MACs) of a forward, per token: counted by torch's FlopCounterMode over a real
forward, so llmshrink's factored and quantized layers count what they actually compute.

FlopCounterMode counts matrix products (mm, addmm, bmm, convolutions, CUDA attention kernels); MACs are
its FLOPs / 2. Elementwise work (norms, activations, softmax, bias adds) is not counted, as is usual.
It has no formula for the CPU attention kernel or for the int8 / 4-bit kernels llmshrink's layers run;
those are added below. Anything else that looks like a matrix product and is still not counted is
reported under "uncounted_ops" / "uncounted_modules" rather than silently left out.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.model_inputs import random_ids
from llmshrink.eval.perplexity import max_positions

_LINEAR_OPS = (  # (namespace, op): input (..., in) -> output (..., out), in * out MACs per row
    ("quantized", "linear_dynamic"),  # Int8DynamicLinear (fbgemm), torch.ao dynamic Linear
    ("quantized", "linear_dynamic_fp16"),
    ("aten", "_int_mm"),
    ("aten", "_weight_int8pack_mm"),  # torchao int8 weight-only on CPU
    ("aten", "_weight_int4pack_mm"),
    ("aten", "_weight_int4pack_mm_for_cpu"),
)
_BNB_LINEAR_OPS = ("gemm_4bit", "gemv_4bit", "int8_linear_matmul", "int8_scaled_mm")  # bitsandbytes
_HEAVY_OP = re.compile(r"mm(_|$)|mv(_|$)|^dot$|matmul|linear|gem[mv]|attention|convolution|conv\dd|einsum")
_NOT_COMPUTE = re.compile(r"prepack|unpack|backward")


def _linear_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape) * a_shape[-1]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # full score matrix, causal or not


def _op_packet(namespace: str, name: str):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _custom_flop_mapping(model: nn.Module) -> dict:
    from llmshrink.targeting import is_bnb_layer

    ops = [_op_packet(ns, name) for ns, name in _LINEAR_OPS]
    if any(is_bnb_layer(m) for m in model.modules()):
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        ops += [_op_packet("bitsandbytes", name) for name in _BNB_LINEAR_OPS]
    mapping = {op: _linear_flops for op in ops if op is not None}
    sdpa_cpu = _op_packet("aten", "_scaled_dot_product_flash_attention_for_cpu")
    if sdpa_cpu is not None:
        mapping[sdpa_cpu] = _sdpa_flops
    return mapping


class _OpNames(TorchDispatchMode):
    """Records the ops a forward runs (the packets), to find matrix products no formula counted."""

    def __init__(self):
        super().__init__()
        self.packets: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.packets.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def _is_linear_like(module: nn.Module) -> bool:
    """A layer that holds a weight and maps in_features to out_features (Linear, Conv1D, llmshrink's, bnb)."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _outer_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers not inside another one (a LoRA wrapper, not also its base layer)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if _is_linear_like(module) and not any(name.startswith(outer + ".") for outer in layers):
            layers[name] = module
    return layers


def _check_length(model: nn.Module, positions: int, what: str) -> None:
    limit = max_positions(model)
    if limit is not None and positions > limit:
        raise LlmshrinkError(f"{what} needs {positions} positions, the model has {limit}")


@torch.no_grad()
def _count_macs(model: nn.Module, run: Callable[[], object], tokens: int) -> dict:
    """MACs per token of `run()` (a forward of `model` over `tokens` tokens), split and checked."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping(model))
    layers = _outer_linear_layers(model)
    per_layer: dict[str, int] = {}
    starts: dict[str, list[int]] = {}
    handles = []

    def pre(name: str):
        return lambda module, args: starts.setdefault(name, []).append(counter.get_total_flops())

    def post(name: str):
        def hook(module, args, output):
            per_layer[name] = per_layer.get(name, 0) + counter.get_total_flops() - starts[name].pop()
        return hook

    for name, layer in layers.items():
        handles += [layer.register_forward_pre_hook(pre(name)), layer.register_forward_hook(post(name))]
    ops = _OpNames()
    was_training = model.training
    model.eval()
    try:
        with counter, ops:
            run()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    total = counter.get_total_flops()
    linear = sum(per_layer.values())
    root = type(model).__name__
    counts = {name.removeprefix(root + "."): sum(per_op.values()) for name, per_op in
              counter.get_flop_counts().items() if name.startswith(root + ".")}
    # In the model's own module order (the counter's is the order of first use).
    by_module = {name: counts[name] / 2 / tokens for name, _ in model.named_modules() if name in counts}
    return {
        "total": total / 2 / tokens,
        "linear": linear / 2 / tokens,
        "attention": (total - linear) / 2 / tokens,
        "by_module": by_module,
        "uncounted_modules": sorted(name or type(model).__name__ for name, flops in per_layer.items() if flops == 0),
        "uncounted_ops": sorted(
            str(packet) for packet in ops.packets
            if packet not in counter.flop_registry and _HEAVY_OP.search(str(packet).split(".")[-1])
            and not _NOT_COMPUTE.search(str(packet))
        ),
    }


def count_macs(module: nn.Module, *args, **kwargs) -> dict:
    """MACs of one call module(*args, **kwargs), in total (not per token); keys as macs_per_token's."""
    return _finish(_count_macs(module, lambda: module(*args, **kwargs), tokens=1))


def macs_per_token(model: nn.Module, seq_len: int = 128, batch_size: int = 1, seed: int = 0) -> dict:
    """Multiply-accumulates per token of one forward (a prefill) over random tokens, no KV cache.

    Returns per token: "total"; "linear" (inside weight layers: Linear, Conv1D, lm_head, llmshrink's
    factored / quantized layers, bitsandbytes); "attention" (the rest: query-key scores and attention x
    values over the full seq_len x seq_len matrix, and small extras such as rotary angles); "by_module"
    (module name -> MACs, every module that did any, nested ones included, a shared block under its own
    name); "uncounted_modules" (weight layers that ran but added no MACs: their kernel is unknown to the
    counter, so "total" is too low) and "uncounted_ops" (matrix-product-like ops with no formula); plus
    seq_len, batch_size and "complete" (both lists empty).
    """
    if seq_len < 1 or batch_size < 1:
        raise LlmshrinkError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    _check_length(model, seq_len, f"macs_per_token(seq_len={seq_len})")
    ids = random_ids(model, batch_size, seq_len, seed)
    result = _count_macs(model, lambda: model(input_ids=ids, use_cache=False), batch_size * seq_len)
    return _finish(result, seq_len=seq_len, batch_size=batch_size)


def macs_per_decode_token(model: nn.Module, context: int = 128, batch_size: int = 1, seed: int = 0) -> dict:
    """Multiply-accumulates of generating one token after `context` cached tokens (a forward of one token
    with past_key_values), per sequence. Same keys as macs_per_token, with "context" instead of seq_len.
    """
    if context < 1 or batch_size < 1:
        raise LlmshrinkError(f"context and batch_size must be >= 1, got {context} and {batch_size}")
    _check_length(model, context + 1, f"macs_per_decode_token(context={context})")
    ids = random_ids(model, batch_size, context + 1, seed)
    with torch.no_grad():
        past = model(input_ids=ids[:, :context], use_cache=True).past_key_values
    if past is None:
        raise LlmshrinkError(f"{type(model).__name__} returned no KV cache; cannot count a decode step")
    with warnings.catch_warnings():
        # transformers 5.2x renames the keyword to `cache` and warns; older releases know only this one
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        result = _count_macs(
            model, lambda: model(input_ids=ids[:, context:], past_key_values=past, use_cache=True), batch_size
        )
    return _finish(result, context=context, batch_size=batch_size)


def _finish(result: dict, **settings) -> dict:
    complete = not (result["uncounted_modules"] or result["uncounted_ops"])
    return {**result, **settings, "complete": complete}
