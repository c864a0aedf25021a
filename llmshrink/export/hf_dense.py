"""hf-dense: a compressed checkpoint written as a plain transformers model (no remote code, no llmshrink).

    densify(model)               each llmshrink layer -> the nn.Linear / GPT-2 Conv1D / nn.Embedding of the weight
                                 it applies (its to_dense()); bitsandbytes layers dequantized; each position of a
                                 shared block gets its own copy; the config's FFN width and head counts set from
                                 the pruned shapes
    export_hf_dense(ckpt, out)   load, densify, save_pretrained (safetensors) + tokenizer into a temporary sibling
                                 of `out`, reload that with plain AutoModelFor*.from_pretrained, compare logits on a
                                 fixed probe with the compressed model's, write export.json, rename into place

Refused in one line, because no plain config holds them: FFN widths or head counts that differ between blocks
(Llama, GPT-2 and BERT configs have one intermediate_size / n_inner and one head count; in transformers 5.25 only
other architectures take per-layer lists: Gemma 3n's intermediate_size, Laguna's num_attention_heads_per_layer),
and pruned heads of GPT-2 and BERT, whose attention takes its head size from hidden_size / heads. Those models keep
the checkpoint's remote code, or go to gguf.

Run-time rounding: Int8DynamicLinear rounds its input to 8 bits per token at every call (on CPU with fbgemm), as do
FakeQuantLinear with `activations` and bitsandbytes int8; a 4-bit bitsandbytes layer may compute in bf16. A dense
layer does none of that, so against the compressed model as it runs the export differs by that rounding (~1%),
not by float error. The tolerance is therefore checked against the compressed model with just those layers
computing in float with their stored weights (the int8 layer's own path off CPU); the difference from the
compressed model as it runs is reported beside it.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from llmshrink.bnb import dequantized_weight
from llmshrink.checkpoint_files import first_few
from llmshrink.checkpoint_load import load_checkpoint, load_tokenizer
from llmshrink.errors import LlmshrinkError
from llmshrink.export.staging import check_destination, staged_folder
from llmshrink.families import FAMILIES, Family, block_list, join
from llmshrink.modules import COMPRESSED_MODULES
from llmshrink.targeting import dense_weight, is_bnb_layer, replace_module

FORMAT = "hf-dense"
PROBE_SHAPE = (2, 32)  # sequences x tokens of the fixed probe (fewer tokens where the model's context is shorter)
# Max |Δlogit| allowed, as a fraction of the reference's largest |logit|. fp32 rounds at 2^-24 (6e-8) relative; a
# dense matmul sums its K products in another order than a factored forward (Kronecker, low-rank, TT, ...), which
# moves an output by ~sqrt(K)·eps of the products' size (~3e-6 at K = 2048), and a few tens of blocks compound it
# (measured on the tests' tiny models: at most ~1e-6). 1e-4 leaves that headroom, while a real mistake (a weight
# transposed, a bias or a permutation lost, a wrong head count) moves logits by a large share of their range.
# Half precision also rounds every dense weight once when stored (fp16 2^-11, bf16 2^-8): looser bounds.
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# The Auto class that rebuilds the exported architecture: the first whose mapping names it.
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
                "AutoModelForTokenClassification", "AutoModel")
# Family name -> (config key of the FFN width, config keys of the query and key-value head counts; None where the
# attention takes its head size from hidden_size / heads, so that no config describes pruned heads).
CONFIG_KEYS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "llama": ("intermediate_size", ("num_attention_heads", "num_key_value_heads")),
    "gemma": ("intermediate_size", ("num_attention_heads", "num_key_value_heads")),
    "gpt2": ("n_inner", None),
    "bert": ("intermediate_size", None),
}
REMOTE_OR_GGUF = "such a model needs the checkpoint's remote code (trust_remote_code=True) or the gguf export"


# --- densify ---------------------------------------------------------------------------------------------


def densify(model: nn.Module, describe: bool = True) -> nn.Module:
    """In place: every llmshrink and bitsandbytes layer becomes the dense layer a plain model of this architecture
    has at that name, shared blocks are copied to each position, and the config is set to the pruned shapes.

    Refuses (LlmshrinkError, one line) shapes no plain config can describe, after the layers were replaced (the
    widths are read from dense layers): densify a copy to keep the original. Afterwards every tensor has the
    shape a plain model built from the config has. `describe=False`: layers only, the config left as it is (the
    GGUF export takes per-block shapes from the tensors, so no config needs to hold them)."""
    plain = _skeleton(model)
    dtype = weights_dtype(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(f"{done}.") for done in replaced):
            continue
        # A shared block's ref (it has bind) is copied below, once its block is dense.
        compressed = (_is_llmshrink(module) and not hasattr(module, "bind")) or is_bnb_layer(module)
        if compressed or (type(module) is nn.Linear and isinstance(_plain_module(plain, name), Conv1D)):
            replace_module(model, name, _dense_layer(name, module, _plain_module(plain, name), dtype))
            replaced.append(name)
    _unshare_blocks(model)
    if hasattr(model.config, "quantization_config"):  # bitsandbytes settings: the weights are float now
        delattr(model.config, "quantization_config")
    if describe:
        reason = describe_config(model)
        if reason is not None:
            raise LlmshrinkError(f"{FORMAT}: {reason}")
    return model


def describe_config(model: nn.Module) -> str | None:
    """After densify(model, describe=False): set the config's FFN width and head counts to the blocks' (pruned)
    ones and return None, or return why no plain config describes them (what densify refuses with; the config may
    then be partly set). Every tensor must then be one a plain model of the config has."""
    return _describe_shapes(model, _skeleton(model)) or _check_shapes(model)


def _is_llmshrink(module: nn.Module) -> bool:
    # By name: a model rebuilt through the checkpoint's remote code holds copies of these classes.
    return type(module).__name__ in COMPRESSED_MODULES


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight (an embedding: the table) that a layer applies."""
    if is_bnb_layer(module):
        return dequantized_weight(module)
    if hasattr(module, "to_dense"):
        return module.to_dense()
    return dense_weight(module)


def _dense_layer(name: str, module: nn.Module, target: nn.Module | None, dtype: torch.dtype) -> nn.Module:
    """The plain layer (the class `target` has in a plain model) computing what `module` computes."""
    weight = layer_weight(module).detach().to(dtype)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().to(dtype)
    with torch.device("meta"):  # shapes only: the weights are assigned below, nothing is initialised
        if type(target) is nn.Embedding:
            layer = nn.Embedding(*weight.shape, padding_idx=getattr(module, "padding_idx", None))
        elif isinstance(target, Conv1D):  # GPT-2 stores (in, out) and always has a bias
            layer, weight = Conv1D(weight.shape[0], weight.shape[1]), weight.T
            bias = torch.zeros(weight.shape[1], dtype=dtype) if bias is None else bias
        elif type(target) is nn.Linear:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            found = "no such module" if target is None else f"a {type(target).__name__}"
            raise LlmshrinkError(f"{FORMAT}: {name} is a {type(module).__name__}, where a plain model of this "
                                 f"architecture has {found}; it cannot be made dense")
    layer.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer


def _unshare_blocks(model: nn.Module) -> None:
    """Each SharedBlockRef becomes its own copy of the block it runs, at its own KV-cache slot (layer_idx)."""
    refs = [(name, m) for name, m in model.named_modules() if _is_llmshrink(m) and hasattr(m, "bind")]
    for name, ref in refs:
        block = copy.deepcopy(ref.block)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = ref.position
        replace_module(model, name, block)


def _describe_shapes(model: nn.Module, plain: nn.Module) -> str | None:
    """Set the config's FFN width and head counts to the blocks' (pruned) ones; or why not, where they differ."""
    model_type = getattr(model.config, "model_type", None)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        return None  # no known layout: _check_shapes still compares every tensor with a plain model's
    ffn_key, head_keys = CONFIG_KEYS[family.name]
    list_name, blocks = block_list(model, family, FORMAT)
    first_plain = block_list(plain, family, FORMAT)[1][0]
    cls = type(model).__name__
    widths = [_ffn_width(block, family) for block in blocks]
    if len(set(widths)) > 1:
        return (f"the blocks of {list_name} have different FFN widths {widths}; a plain {cls} config has one "
                f"{ffn_key}: {REMOTE_OR_GGUF} (llama.cpp reads per-layer widths)")
    if widths[0] != _ffn_width(first_plain, family):
        setattr(model.config, ffn_key, widths[0])
    heads = [_head_counts(block, family) for block in blocks]
    configured = _head_counts(first_plain, family)
    if head_keys is None:
        if any(count != configured for count in heads):
            return (f"the blocks of {list_name} keep {[count[0] for count in heads]} of {configured[0]} attention "
                    f"heads; a plain {cls} takes its head size from the hidden size / heads, so no config describes "
                    "pruned heads: such a model needs the checkpoint's remote code (trust_remote_code=True)")
        return None
    if len(set(heads)) > 1:
        return (f"the blocks of {list_name} have different head counts (query, key-value) {heads}; a plain {cls} "
                f"config has one {head_keys[0]} and {head_keys[1]}: {REMOTE_OR_GGUF} (llama.cpp reads per-layer "
                "head counts)")
    if heads[0] != configured:
        attention = blocks[0].get_submodule(family.attention)
        model.config.head_dim = int(getattr(attention, family.head_dim))  # no longer hidden_size / heads
        for key, count in zip(head_keys, heads[0], strict=True):
            setattr(model.config, key, count)
    return None


def _ffn_width(block: nn.Module, family: Family) -> int:
    return int(dense_weight(block.get_submodule(join(family.mlp, family.mlp_inputs[0]))).shape[0])


def _head_counts(block: nn.Module, family: Family) -> tuple[int, ...]:
    """(query heads,) from the attention's attribute where it has one (GPT-2, BERT); else (query, key-value)
    heads from the projections' rows (Llama-style attention reshapes by head size)."""
    attention = block.get_submodule(family.attention)
    counted = [attr for attr, kind in family.head_attrs if kind == "heads"]
    if counted:
        return (int(getattr(attention, counted[0])),)
    size = int(getattr(attention, family.head_dim))
    q, k = (dense_weight(attention.get_submodule(name)).shape[0] // size for name in family.qkv[:2])
    return int(q), int(k)


def _check_shapes(model: nn.Module) -> str | None:
    """None where every tensor is one a plain model of the (updated) config has, of the same shape; else which not."""
    plain = _skeleton(model)
    want = {key: tuple(t.shape) for key, t in plain.state_dict().items()}
    have = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            return (f"{key}: the densified model has {have.get(key, 'no such tensor')}, a plain "
                    f"{type(plain).__name__} of its config {want.get(key, 'no such tensor')}")
    return None


def _skeleton(model: nn.Module) -> nn.Module:
    """A plain model of the architecture built from (a copy of) the model's config on the meta device: which
    class each layer has there, and which shapes the config gives; no memory, no initialisation."""
    with torch.device("meta"):
        return plain_class(model)(copy.deepcopy(model.config))


def _plain_module(plain: nn.Module, name: str) -> nn.Module | None:
    try:
        return plain.get_submodule(name)
    except AttributeError:
        return None


def plain_class(model: nn.Module) -> type:
    """The transformers class the model is built on (skipping a remote-code subclass)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise LlmshrinkError(f"{FORMAT}: {type(model).__name__} is not built on a transformers model class")


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype most of the model's parameters have (the dense layers get it too)."""
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


# --- export ----------------------------------------------------------------------------------------------


def export_hf_dense(checkpoint: str | Path, out: str | Path, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write checkpoint `checkpoint` as a plain transformers model at `out` (a new folder), verified by reloading it
    with plain transformers; returns (and writes to out/export.json) what was written and how it compares."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_destination(FORMAT, checkpoint, out)
    model = load_checkpoint(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    ids = probe_ids(model.config)
    as_run, reference, rounding = reference_logits(model, ids)
    densify(model)
    dtype = weights_dtype(model)
    auto = _auto_class(model)
    with staged_folder(FORMAT, out) as staged:
        model.save_pretrained(staged.folder)  # safetensors; tied weights written once
        del model
        if tokenizer is not None:
            tokenizer.save_pretrained(staged.folder)
        got, params, architecture = _reload(auto, staged.folder, dtype, ids)
        checked = max_abs_diff(got, reference)
        rtol = RTOL.get(dtype, RTOL[torch.float32])
        tolerance = rtol * float(reference.abs().max())
        if not checked <= tolerance:  # also refuses NaN
            raise LlmshrinkError(
                f"{FORMAT}: the exported model's logits differ from the compressed model's by {checked:.3g} "
                f"(max |Δ|), above the tolerance {tolerance:.3g} ({rtol:g} x max |logit|); nothing was written")
        result = staged.record = {
            "format": FORMAT, "path": str(out), "source": str(checkpoint), "architecture": architecture,
            "dtype": str(dtype).removeprefix("torch."),
            "params": params, "bytes": sum(f.stat().st_size for f in staged.folder.glob("*.safetensors")),
            "probe": {"sequences": int(ids.shape[0]), "tokens": int(ids.numel())},
            # Against the compressed model as it runs (its run-time rounding included).
            "max_abs_logit_diff": max_abs_diff(got, as_run), "top1_agreement": top1_agreement(got, as_run),
            # Against what the tolerance applies to: the same, with the rounding layers computing in float.
            "rounding_layers": len(rounding), "checked_max_abs_diff": checked, "tolerance": tolerance,
        }
    log(f"{FORMAT}: {out}: {params:,} params, {result['bytes'] / 1e6:.1f} MB; logits against the compressed model: "
        f"max |Δ| {result['max_abs_logit_diff']:.2g}, top-1 agreement {result['top1_agreement']:.1%}")
    if rounding:
        log(f"{FORMAT}: {len(rounding)} layers that round their inputs at run time (int8, low-precision kernels) "
            f"compute in float here: max |Δ| {checked:.2g} against the compressed model with them in float")
    return result


def checkpoint_tokenizer(checkpoint: Path) -> Any:
    """The checkpoint's tokenizer, or None where it saved none (every export copies it when there is one)."""
    return load_tokenizer(checkpoint) if (checkpoint / "tokenizer_config.json").is_file() else None


def _reload(auto: str, folder: Path, dtype: torch.dtype, ids: torch.Tensor) -> tuple[torch.Tensor, int, str]:
    """Logits of `folder` loaded with plain transformers (no remote code), its parameter count and class name."""
    model, info = getattr(transformers, auto).from_pretrained(folder, dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in info.get(kind) or [])
        if keys:
            raise LlmshrinkError(f"{FORMAT}: plain {type(model).__name__} reports {kind.replace('_', ' ')} in the "
                                 f"export: {first_few(keys)}")
    return logits(model.eval(), ids), sum(p.numel() for p in model.parameters()), type(model).__name__


def _auto_class(model: nn.Module) -> str:
    cls = plain_class(model)
    for name in AUTO_CLASSES:
        try:
            if getattr(transformers, name)._model_mapping[type(model.config)] is cls:
                return name
        except KeyError:
            continue
    raise LlmshrinkError(f"{FORMAT}: no transformers Auto class loads {cls.__name__}")


# --- the probe and the comparison ------------------------------------------------------------------------


def probe_length(config: Any) -> int:
    """Tokens per probe sequence: PROBE_SHAPE's, or the model's context where that is shorter (GPT-2's config maps
    max_position_embeddings to n_positions; a config that names neither: PROBE_SHAPE's)."""
    length = PROBE_SHAPE[1]
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(length, int(context or length))


def probe_ids(config: Any) -> torch.Tensor:
    """Fixed token ids (seeded) within the vocabulary and the context length."""
    shape = (PROBE_SHAPE[0], probe_length(config))
    return torch.randint(0, int(config.vocab_size), shape, generator=torch.Generator().manual_seed(0))


def reference_logits(model: nn.Module, ids: torch.Tensor,
                     float32: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(as run, reference, rounding layers): the compressed model's logits of `ids` as it runs, and the reference
    an export is checked against: the same with its rounding layers computing in float (see the docstring).
    `float32` (a file of float32 weights): the model is then cast to float32 in place for the reference, so that a
    half-precision checkpoint's own rounding (bf16: ~1e-2 of a logit) is not held against the file."""
    as_run = logits(model, ids)
    cast = float32 and any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    if cast:
        model.float()
    rounding = rounding_layers(model)
    if not rounding and not cast:
        return as_run, as_run, rounding
    with float_inputs(model, rounding):
        return as_run, logits(model, ids), rounding


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    found = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state  # a bare encoder
    return found.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def rounding_layers(model: nn.Module) -> list[str]:
    """Layers whose forward rounds its input at run time, or computes in low precision: see the docstring."""
    def rounds(m: nn.Module) -> bool:
        kind = type(m).__name__
        if kind == "Linear4bit":  # dequantizes to compute_dtype: exact in fp32
            return getattr(m, "compute_dtype", None) not in (None, torch.float32)
        return (kind == "Int8DynamicLinear" or is_bnb_layer(m)  # bnb int8 rounds its inputs too
                or (kind == "FakeQuantLinear" and bool(getattr(m, "activations", False))))

    return [name for name, m in model.named_modules() if rounds(m)]


@contextmanager
def float_inputs(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within: the named layers compute x @ Wᵀ + b in the input's float dtype with the weight they store."""
    layers = [model.get_submodule(name) for name in names]
    for layer in layers:
        layer.forward = partial(_float_linear, layer_weight(layer).detach(), getattr(layer, "bias", None))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
