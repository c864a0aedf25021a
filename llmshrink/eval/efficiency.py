"""Size, speed, compute and memory of a model: what the final `apply` table compares, base against compressed.

params (unique), bytes (state dict / on disk), load time, latency and tokens/s (measure_latency), MACs per
token (macs_per_token, macs_per_decode_token: counted by torch's FlopCounterMode over a real forward, so
llmshrink's factored layers count what they actually compute), and peak RAM while loading and generating
(measure_memory, in a fresh subprocess: peak RSS never goes down within a process).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import torch
from safetensors.torch import save as save_bytes
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.perplexity import max_positions

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
    """Number of unique parameters: tied or shared weights count once. Weights that llmshrink's int8 and
    clustered layers keep in integer buffers count as the parameters they stand for (as bitsandbytes'
    packed 4-bit parameters do); other buffers do not count."""
    params = sum(_weights(p) for p in _unique_params(model).values())
    return params + sum(m.buffered_weights() for m in model.modules() if hasattr(m, "buffered_weights"))


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
    """Bytes of the model's state dict written as one .safetensors file (tied weights once), computed
    exactly without writing anything: 8 bytes of header length, the JSON header (padded to 8 bytes as
    safetensors pads it), then the tensor data.

    The header's key order, dtype names and padding come from safetensors itself, by serialising
    one-element stand-ins in memory; only their shapes and byte offsets are replaced.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            tensors[name] = t
    if not tensors:
        return len(save_bytes({}, metadata={"format": "pt"}))
    probe_bytes = save_bytes({name: torch.zeros(1, dtype=t.dtype) for name, t in tensors.items()},
                             metadata={"format": "pt"})
    length = int.from_bytes(probe_bytes[:8], "little")
    probe_text = probe_bytes[8:8 + length].decode("utf-8")
    header = json.loads(probe_text)
    if _compact_json(header) != probe_text.rstrip(" "):  # a safetensors that writes headers another way
        return len(save_bytes({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
                              metadata={"format": "pt"}))
    data_order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    offset = 0
    for name in data_order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {**header[name], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text_bytes = len(_compact_json(header).encode("utf-8"))
    if _pads_header():
        text_bytes += -text_bytes % 8
    return 8 + text_bytes + offset


def _compact_json(value) -> str:
    # serde_json's compact form, as safetensors (Rust) writes its header
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@functools.cache
def _pads_header() -> bool:
    """Whether this safetensors pads the header to 8 bytes (newer versions do), seen on a 54-byte header."""
    probe = save_bytes({"ab": torch.zeros(1, dtype=torch.uint8)})
    return int.from_bytes(probe[:8], "little") % 8 == 0


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
    """Peak resident memory of this process so far, in MiB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this process's own address space. Not
    ru_maxrss, which Linux carries across fork + exec: a fresh child would report its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
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


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per new token, after that
    token's forward, so the first call ends the prefill and the calls after it time the decode steps."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
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
        "pad_token_id": _pad_token_id(model, tokenizer_or_vocab_size),
    }

    was_training = model.training
    model.eval()
    prefill_s: list[float] = []
    decode_s: list[float] = []
    try:
        for i in range(warmup + repeats):
            _sync(device)
            with timed() as t_prefill:
                model(input_ids=input_ids, attention_mask=attention_mask)
                _sync(device)
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


# ---- MACs per token -------------------------------------------------------------------------------------
# FlopCounterMode counts matrix products (mm, addmm, bmm, convolutions, CUDA attention kernels); MACs are
# its FLOPs / 2. Elementwise work (norms, activations, softmax, bias adds) is not counted, as is usual.
# It has no formula for the CPU attention kernel or for the int8 / 4-bit kernels llmshrink's layers run;
# those are added below. Anything else that looks like a matrix product and is still not counted is
# reported under "uncounted_ops" / "uncounted_modules" rather than silently left out.

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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _random_ids(model: nn.Module, batch_size: int, length: int, seed: int) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise LlmshrinkError(f"{type(model).__name__}: config has no vocab_size to draw token ids from")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, length), generator=generator).to(_model_device(model))


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
    ids = _random_ids(model, batch_size, seq_len, seed)
    result = _count_macs(model, lambda: model(input_ids=ids, use_cache=False), batch_size * seq_len)
    return _finish(result, seq_len=seq_len, batch_size=batch_size)


def macs_per_decode_token(model: nn.Module, context: int = 128, batch_size: int = 1, seed: int = 0) -> dict:
    """Multiply-accumulates of generating one token after `context` cached tokens (a forward of one token
    with past_key_values), per sequence. Same keys as macs_per_token, with "context" instead of seq_len.
    """
    if context < 1 or batch_size < 1:
        raise LlmshrinkError(f"context and batch_size must be >= 1, got {context} and {batch_size}")
    _check_length(model, context + 1, f"macs_per_decode_token(context={context})")
    ids = _random_ids(model, batch_size, context + 1, seed)
    with torch.no_grad():
        past = model(input_ids=ids[:, :context], use_cache=True).past_key_values
    if past is None:
        raise LlmshrinkError(f"{type(model).__name__} returned no KV cache; cannot count a decode step")
    result = _count_macs(
        model, lambda: model(input_ids=ids[:, context:], past_key_values=past, use_cache=True), batch_size
    )
    return _finish(result, context=context, batch_size=batch_size)


def _finish(result: dict, **settings) -> dict:
    complete = not (result["uncounted_modules"] or result["uncounted_ops"])
    return {**result, **settings, "complete": complete}


# ---- peak RAM while loading and generating ---------------------------------------------------------------
_PROBE = "import sys; from llmshrink.eval.efficiency import _memory_probe; _memory_probe(sys.argv[1])"
_MB = 1024 * 1024


def measure_memory(
    model: str | os.PathLike,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    batch_size: int = 1,
    device: str = "cpu",
    timeout: float = 1800,
) -> dict:
    """Peak memory of loading `model` and generating with it, measured in a fresh Python process.

    `model`: an llmshrink checkpoint directory (loaded by load_checkpoint), or anything load_base_model
    takes (a local transformers directory, builtin:NAME, a hub id). The child imports torch,
    transformers and llmshrink, then loads, then greedily generates `new_tokens` tokens after
    `batch_size` random prompts of `prompt_tokens` tokens. Returns, in MiB of resident memory:
    "rss_before_load_mb" (resident just before loading: the interpreter and libraries),
    "peak_rss_load_mb" (peak of the process once loaded), "peak_rss_generate_mb" (peak of the whole
    process after generating), on CUDA "peak_gpu_load_mb" / "peak_gpu_generate_mb"
    (torch.cuda.max_memory_allocated), "generated_tokens", and the arguments. Peaks include the
    baseline: the model's own share is peak - rss_before_load_mb. Each call starts Python and imports
    transformers afresh (~10 s on a small CPU).
    """
    if prompt_tokens < 1 or new_tokens < 1 or batch_size < 1:
        raise LlmshrinkError("prompt_tokens, new_tokens and batch_size must all be >= 1")
    args = {"model": str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "batch_size": batch_size, "device": device}
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])  # the llmshrink the caller runs, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlmshrinkError(f"measure_memory({model}): no result after {timeout:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        # The last stderr line is the child's exception; a kill (e.g. out of memory) leaves none.
        stderr = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        tail = stderr[-1][-500:] if stderr else "no error output"
        killed = f", killed by signal {-proc.returncode}" if proc.returncode < 0 else ""
        raise LlmshrinkError(f"measure_memory({model}) failed (exit {proc.returncode}{killed}): {tail}")
    return {**json.loads(lines[-1]), **args}


def _memory_probe(arg: str) -> None:
    """The child of measure_memory: load, generate, print one JSON line of peaks."""
    args = json.loads(arg)
    device = torch.device(args["device"])
    import transformers  # noqa: F401  (before the baseline: its import is not the model's memory)

    from llmshrink.checkpoint import MANIFEST_FILE, load_checkpoint
    from llmshrink.models import load_base_model

    gpu = device.type == "cuda"
    out = {"rss_before_load_mb": psutil.Process().memory_info().rss / _MB}
    path = Path(args["model"]).expanduser()
    if (path / MANIFEST_FILE).is_file():
        model = load_checkpoint(path, device)
    else:
        model = load_base_model(args["model"], device=device, log=lambda _: None).model
    if gpu:
        torch.cuda.synchronize(device)
        out["peak_gpu_load_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    out["peak_rss_load_mb"] = peak_rss_mb()
    ids = _random_ids(model, args["batch_size"], args["prompt_tokens"], seed=0)
    with torch.inference_mode():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["new_tokens"],
            min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=_pad_token_id(model, None),
        )
    if gpu:
        torch.cuda.synchronize(device)
        out["peak_gpu_generate_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    out["peak_rss_generate_mb"] = peak_rss_mb()
    out["generated_tokens"] = int(generated.shape[1] - ids.shape[1])
    print(json.dumps(out), flush=True)
