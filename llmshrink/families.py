"""Model families as data: where a transformer keeps its blocks, attention and FFN projections.

The structural passes (prune_ffn, prune_heads, drop_layers, share_layers) read a model's Family instead of
class names or attribute sniffing, so a new architecture with a known layout is one entry in FAMILIES (plus a
tiny builder in tests/conftest.py, which puts it in every structural test). A family is chosen by
`config.model_type`; checkpoints llmshrink writes keep the base's model_type, remote code or not.

Names are relative: `blocks` to the base model (model.base_model: model.model, model.transformer, model.bert),
`attention`, `attention_output` and `mlp` to a block, `qkv` to the attention, `mlp_inputs`/`mlp_output` to the
mlp. A single `qkv` name is a fused q | k | v projection (GPT-2's Conv1D c_attn).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.modules.shared_block import SharedBlockRef


@dataclass(frozen=True)
class Family:
    name: str  # what pass records say: gpt2 | llama | gemma | bert
    label: str  # for messages
    model_types: tuple[str, ...]  # the config.model_type values it covers
    blocks: str
    attention: str
    qkv: tuple[str, ...]
    attention_output: str
    head_dim: str  # attribute of the attention module: the size of one head
    kv_groups: str | None  # attribute of the attention module: query heads per key-value head (GQA)
    # Attributes the attention reads at forward time that pruning heads changes: (attribute, "heads" | "width").
    head_attrs: tuple[tuple[str, str], ...]
    mlp: str  # "" when the FFN's layers hang off the block itself (BERT)
    mlp_inputs: tuple[str, ...]  # the layers whose output rows are the FFN's neurons
    mlp_output: str  # the layer whose input columns are the FFN's neurons
    # Config lists with one entry per block (e.g. sliding or full attention): removing blocks removes entries,
    # and blocks that share must agree on them.
    per_block_config: tuple[str, ...] = ("layer_types",)
    causal: bool = True  # a language model predicting the next token (Taylor importance needs that loss)


LLAMA = Family(
    name="llama", label="Llama-style (Llama, Mistral, Qwen2, Qwen3)",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="layers", attention="self_attn", qkv=("q_proj", "k_proj", "v_proj"), attention_output="self_attn.o_proj",
    head_dim="head_dim", kv_groups="num_key_value_groups", head_attrs=(),
    mlp="mlp", mlp_inputs=("gate_proj", "up_proj"), mlp_output="down_proj",
)
# Gemma's layout is Llama's; its q_norm / k_norm act on one head's features, so they stay as they are.
GEMMA = replace(LLAMA, name="gemma", label="Gemma (1, 2, 3 text)", model_types=("gemma", "gemma2", "gemma3_text"))
GPT2 = Family(
    name="gpt2", label="GPT-2", model_types=("gpt2",),
    blocks="h", attention="attn", qkv=("c_attn",), attention_output="attn.c_proj",
    head_dim="head_dim", kv_groups=None, head_attrs=(("num_heads", "heads"), ("split_size", "width")),
    mlp="mlp", mlp_inputs=("c_fc",), mlp_output="c_proj",
)
BERT = Family(
    name="bert", label="BERT-style (BERT, RoBERTa, MiniLM)", model_types=("bert", "roberta", "xlm-roberta"),
    blocks="encoder.layer", attention="attention.self", qkv=("query", "key", "value"),
    attention_output="attention.output.dense",
    head_dim="attention_head_size", kv_groups=None,
    head_attrs=(("num_attention_heads", "heads"), ("all_head_size", "width")),
    mlp="", mlp_inputs=("intermediate.dense",), mlp_output="output.dense", causal=False,
)
FAMILIES = (LLAMA, GEMMA, GPT2, BERT)


def supported() -> str:
    return "; ".join(f"{f.label}: model_type {', '.join(f.model_types)}" for f in FAMILIES)


def family_of(model: nn.Module, pass_name: str) -> Family:
    """The family of `model` by its config.model_type, or one line naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise LlmshrinkError(
        f"{pass_name}: {type(model).__name__} (model_type {model_type!r}) is not supported; supported: {supported()}"
    )


def block_list(model: nn.Module, family: Family, pass_name: str) -> tuple[str, nn.ModuleList]:
    """(full name, the ModuleList of blocks) of a model of `family`."""
    base = getattr(model, "base_model", model)
    try:
        blocks = base.get_submodule(family.blocks)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise LlmshrinkError(
            f"{pass_name}: {type(model).__name__} has no block list at {family.blocks!r} as {family.label} "
            "models do; is it a modified model?"
        )
    name = next(n for n, m in model.named_modules() if m is blocks)
    return name, blocks


def iter_blocks(model: nn.Module, family: Family, pass_name: str) -> Iterator[tuple[int, str]]:
    """(index, full name) of each block that holds its own weights (a shared position's reference does not)."""
    list_name, blocks = block_list(model, family, pass_name)
    for index, block in enumerate(blocks):
        if not isinstance(block, SharedBlockRef):
            yield index, f"{list_name}.{index}"


def join(*parts: str) -> str:
    """A dotted module name from relative parts, skipping empty ones (BERT's FFN sits on the block)."""
    return ".".join(part for part in parts if part)
