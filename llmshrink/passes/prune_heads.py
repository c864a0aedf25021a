"""prune_heads pass: remove whole attention heads by importance, physically shrinking the projections.

Query head h owns rows h·d..(h+1)·d of the query projection and the same columns of the output
projection (d: head size); its key/value rows belong to its key-value group (h // query heads per
group). Where the projections are, and which attributes the attention reads at forward time, is the
model's Family (llmshrink/families.py). Two units of pruning:

    kv_group     a key-value group with its query heads (one head when there is no GQA), so the query
                 heads per kv group stay what the config says
    query_head   query heads only, the same number from every kv group of a layer, k/v untouched; the
                 attention's `num_key_value_groups` becomes the query heads each group keeps

e.g.  GPT-2   attn.c_attn (Conv1D: q | k | v blocks) output columns    attn.c_proj input rows
      Llama   self_attn.q_proj rows, k_proj / v_proj rows per group    self_attn.o_proj columns
      BERT    attention.self.query / key / value rows                  attention.output.dense columns

Pruned layers become PrunedLinear. Attributes the attention reads at forward time (GPT-2's split_size,
BERT's all_head_size, num_key_value_groups) are set with `set_module_attrs`, which checkpoints record
and restore; Llama-style attention reshapes by head size (-1 heads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import family_of, iter_blocks, join
from llmshrink.importance import importance_scores
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.prune_heads import PruneHeadsConfig
from llmshrink.prune_units import (
    check_dense,
    choose_blocks,
    family_module,
    group_heads,
    head_features,
    heads_in_slots,
    select_units,
    slot_scores,
    top,
)
from llmshrink.refit_output import refit, refit_sums
from llmshrink.targeting import (
    dense_weight,
    hooked_eval,
    layer_index,
    replace_module,
    set_module_attrs,
    token_windows,
)


@dataclass(frozen=True)
class AttentionBlock:
    name: str  # the attention module whose head attributes change (GPT2Attention, LlamaAttention, ...)
    family: str  # the Family's name: llama | gemma | gpt2 | bert
    heads: int  # query heads now
    group: int  # query heads per key-value group
    head_dim: int
    qkv: tuple[str, ...]  # c_attn | q_proj, k_proj, v_proj | query, key, value
    output: str  # c_proj | o_proj | attention.output.dense
    per_head: bool = False  # unit: query_head (scores per query head, units are per-group slots)
    head_attrs: tuple[tuple[str, str], ...] = ()  # the Family's: (attribute, "heads" | "width")
    kv_groups_attr: str | None = None  # the attention's attribute holding `group`, if it has one

    @property
    def kv_groups(self) -> int:
        return self.heads // self.group

    @property
    def fused(self) -> bool:
        return len(self.qkv) == 1

    @property
    def scored(self) -> int:
        """Scores per layer: one per kv group, or (query_head) one per query head."""
        return self.heads if self.per_head else self.kv_groups


def apply(model, cfg: PruneHeadsConfig, ctx: Context) -> PassRecord:
    blocks = find_attention_blocks(model, cfg.layers, cfg.targets, cfg.exclude, cfg.unit)
    _check_units(blocks)
    if cfg.heads_per_layer is not None:
        _check_heads_per_layer(cfg.heads_per_layer, blocks)
    scores, tokens = importance_scores(
        # Taylor needs a next-token loss, which an encoder family has not.
        "prune_heads", cfg.importance, not family_of(model, "prune_heads").causal, ctx, cfg.calibration_tokens,
        magnitude=lambda: magnitude_scores(model, blocks),
        calibration=lambda ids, taylor: calibration_scores(model, blocks, ids, taylor=taylor),
        alternatives="'output_norm' or 'magnitude'", model_name=type(model).__name__,
    )
    normalize = cfg.normalize
    if normalize == "auto":
        normalize = "none" if cfg.importance == "taylor" else "layer_mean"
    units = {b.name: slot_scores(scores[b.name], b.group) if b.per_head else scores[b.name] for b in blocks}
    if cfg.heads_per_layer is not None:
        counts = {b.name: cfg.heads_per_layer // (b.kv_groups if b.per_head else b.group) for b in blocks}
    else:
        kept_units = select_units(units, 0.5 if cfg.keep is None else cfg.keep, cfg.scope, normalize)
        counts = {name: int(kept.numel()) for name, kept in kept_units.items()}

    model_params = _params(model)
    kept = {block.name: kept_heads(block, scores[block.name], counts[block.name]) for block in blocks}
    sums, refit_tokens = {}, None
    if cfg.refit_output:  # measured on the dense attentions, before any is pruned
        shrinking = [block for block in blocks if kept[block.name].numel() < block.heads]
        outputs = {block.name: model.get_submodule(block.output) for block in shrinking}
        features = {block.name: head_features(kept[block.name], block.head_dim) for block in shrinking}
        sums, refit_tokens = refit_sums(model, outputs, features, cfg.refit_tokens, ctx)
    layers = []
    for block in blocks:
        heads = kept[block.name]
        params = block_params(model, block)
        if heads.numel() < block.heads:  # a layer keeping every head stays as it is
            prune_block(model, block, heads)
            if block.name in sums:
                refit(model.get_submodule(block.output), *sums.pop(block.name))
        removed = sorted(set(range(block.heads)) - set(heads.tolist()))
        groups = sorted({h // block.group for h in heads.tolist()})
        layers.append({
            "name": block.name,
            "layer": layer_index(block.name),
            "heads_kept": int(heads.numel()),
            "heads_total": block.heads,
            "kv_groups_kept": len(groups),
            "kv_groups_total": block.kv_groups,
            # Indices as the layer was before this pass (a second prune_heads counts from its survivors).
            "removed_heads": removed,
            "removed_kv_groups": sorted(set(range(block.kv_groups)) - set(groups)),
            "scores": [float(f"{s:.6g}") for s in scores[block.name].tolist()],  # per kv group | query head
            "params_before": params,
            "params_after": block_params(model, block),
        })
        ctx.log(f"  {block.name}: {layers[-1]['heads_kept']}/{block.heads} heads kept")
    return {
        "family": blocks[0].family,
        "unit": cfg.unit,
        "importance": cfg.importance,
        "scope": "per_layer" if cfg.heads_per_layer is not None else cfg.scope,
        "normalize": normalize if cfg.scope == "global" and cfg.heads_per_layer is None else None,
        "calibration_tokens": tokens,
        "refit_tokens": refit_tokens,
        "heads_before": sum(layer["heads_total"] for layer in layers),
        "heads_after": sum(layer["heads_kept"] for layer in layers),
        "heads_kept": [layer["heads_kept"] for layer in layers],  # per pruned layer, for (layers, heads) tables
        "params_before": sum(layer["params_before"] for layer in layers),
        "params_after": sum(layer["params_after"] for layer in layers),
        "model_params_before": model_params,
        "model_params_after": _params(model),
        "layers": layers,
    }


# --- structure -------------------------------------------------------------------------------------


def find_attention_blocks(
    model: nn.Module,
    layers: list[int] | None = None,
    targets: str = ".*",
    exclude: str | None = None,
    unit: str = "kv_group",
) -> list[AttentionBlock]:
    """The self-attentions of the model's family that targets / exclude / layers choose, in model order."""
    family = family_of(model, "prune_heads")
    names = dict(iter_blocks(model, family, "prune_heads"))  # block index -> the block's name
    found = [(index, join(block, family.attention)) for index, block in names.items()]
    chosen = choose_blocks(found, targets, exclude, layers, "prune_heads", "attention block", type(model).__name__)
    blocks = []
    for index, name in chosen:
        attention = family_module(model, name, "prune_heads", "the attention")
        block = AttentionBlock(
            name, family.name, 0, getattr(attention, family.kv_groups) if family.kv_groups else 1,
            getattr(attention, family.head_dim), tuple(join(name, p) for p in family.qkv),
            join(names[index], family.attention_output),
            unit == "query_head", family.head_attrs, family.kv_groups,
        )
        blocks.append(_with_head_count(model, block))
    return blocks


def _with_head_count(model: nn.Module, block: AttentionBlock) -> AttentionBlock:
    """The block with its head count read from the projection shapes (which earlier pruning changed)."""
    check_dense(model, (*block.qkv, block.output), "prune_heads", "the attention")
    width = dense_weight(model.get_submodule(block.output)).shape[1]
    first = dense_weight(model.get_submodule(block.qkv[0])).shape[0]
    g = block.group
    if block.fused:  # q | k | v rows: width + 2 x width / group
        q_rows = first * g // (g + 2)
        kv_rows = (first - q_rows) // 2
    else:
        q_rows, kv_rows = first, dense_weight(model.get_submodule(block.qkv[1])).shape[0]
    if q_rows != width or width % block.head_dim or kv_rows * g != width:
        raise LlmshrinkError(
            f"prune_heads: {block.name}: projections disagree on the heads: query {q_rows}, key/value {kv_rows}, "
            f"output {width} features, head size {block.head_dim}, {g} query heads per kv group"
        )
    return replace(block, heads=width // block.head_dim)


def _check_units(blocks: list[AttentionBlock]) -> None:
    for block in blocks:
        if not block.per_head and block.kv_groups == 1 and block.heads > 1:
            raise LlmshrinkError(
                f"prune_heads.unit: 'kv_group' cannot prune {block.name}, whose {block.heads} query heads share a "
                "single key-value head; use unit: query_head"
            )
        if block.per_head and block.group == 1:
            raise LlmshrinkError(
                f"prune_heads.unit: 'query_head' removes query heads within kv groups and {block.name} has one "
                "query head per kv group (no GQA); use unit: kv_group"
            )


def _check_heads_per_layer(count: int, blocks: list[AttentionBlock]) -> None:
    for block in blocks:
        if count > block.heads:
            raise LlmshrinkError(
                f"prune_heads.heads_per_layer: {count} exceeds the {block.heads} heads of {block.name}"
            )
        if block.per_head and count % block.kv_groups:
            raise LlmshrinkError(
                f"prune_heads.heads_per_layer: {count} is not a multiple of {block.kv_groups}, the kv groups of "
                f"{block.name} (unit: query_head keeps as many query heads in every kv group)"
            )
        if not block.per_head and count % block.group:
            raise LlmshrinkError(
                f"prune_heads.heads_per_layer: {count} is not a multiple of {block.group}, the query heads per "
                f"kv group of {block.name} (heads are removed with their kv group)"
            )


def block_params(model: nn.Module, block: AttentionBlock) -> int:
    return sum(p.numel() for name in (*block.qkv, block.output) for p in model.get_submodule(name).parameters())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kept_heads(block: AttentionBlock, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted query heads kept when the layer keeps `count` units: its best kv groups, or (query_head) the
    best `count` heads of every kv group."""
    if block.per_head:
        return heads_in_slots(scores, block.group, count)
    return group_heads(top(scores, count), block.group)


def prune_block(model: nn.Module, block: AttentionBlock, heads: torch.Tensor) -> None:
    """Keep query heads `heads` (sorted): kv_group, with their kv groups; query_head, with every kv group."""
    d = block.head_dim
    q = head_features(heads, d)
    if block.per_head:
        kv = torch.arange(block.kv_groups * d)  # every key / value head stays
        group = int(heads.numel()) // block.kv_groups
    else:
        kv = head_features(torch.unique(heads // block.group), d)
        group = block.group
    attention = model.get_submodule(block.name)
    if block.fused:  # the same heads in the q, k and v blocks of one projection
        width, kv_width = block.heads * d, block.kv_groups * d
        rows = torch.cat([q, kv + width, kv + width + kv_width])
        replace_module(model, block.qkv[0], PrunedLinear.from_linear(model.get_submodule(block.qkv[0]), keep_out=rows))
    else:
        for name, rows in zip(block.qkv, (q, kv, kv), strict=True):
            if rows.numel() < dense_weight(model.get_submodule(name)).shape[0]:
                replace_module(model, name, PrunedLinear.from_linear(model.get_submodule(name), keep_out=rows))
    replace_module(model, block.output, PrunedLinear.from_linear(model.get_submodule(block.output), keep_in=q))
    attrs = {attr: int(heads.numel()) if kind == "heads" else int(q.numel()) for attr, kind in block.head_attrs}
    if block.per_head and block.kv_groups_attr:
        attrs[block.kv_groups_attr] = group  # read at forward time by eager and sdpa attention (repeat_kv)
    if attrs:
        set_module_attrs(attention, **attrs)


# --- importance ------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_scores(model: nn.Module, blocks: list[AttentionBlock]) -> dict[str, torch.Tensor]:
    """L2 norm of a unit's weights: a kv group's query, key, value rows and output columns, or (query_head)
    a query head's query rows and output columns."""
    scores = {}
    for block in blocks:
        d = block.head_dim
        q, k, v = _qkv_weights(model, block)
        out = dense_weight(model.get_submodule(block.output)).double()
        per_head = out.reshape(out.shape[0], block.heads, d).pow(2).sum((0, 2))
        per_head += q.reshape(block.heads, d, -1).pow(2).sum((1, 2))
        if block.per_head:
            squares = per_head
        else:
            squares = per_head.reshape(block.kv_groups, block.group).sum(1)
            for w in (k, v):
                squares += w.reshape(block.kv_groups, d, -1).pow(2).sum((1, 2))
        scores[block.name] = squares.sqrt().cpu()
    return scores


def _qkv_weights(model: nn.Module, block: AttentionBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (out, in) weights of the query, key and value projections, in float64 (split when fused)."""
    if not block.fused:
        return tuple(dense_weight(model.get_submodule(name)).double() for name in block.qkv)
    w = dense_weight(model.get_submodule(block.qkv[0])).double()
    kv_width = block.kv_groups * block.head_dim
    return torch.split(w, [block.heads * block.head_dim, kv_width, kv_width])


def calibration_scores(
    model: nn.Module, blocks: list[AttentionBlock], ids: torch.Tensor, taylor: bool
) -> dict[str, torch.Tensor]:
    """Per kv group (or query head, unit: query_head): mean over tokens of ‖its output-projected contribution‖ (output_norm), or the sum over
    calibration windows of |∂L/∂g| for a gate g scaling its heads' outputs (taylor; L: summed next-token loss).
    """
    ids = torch.as_tensor(ids).reshape(-1).long()
    sums = {b.name: torch.zeros(b.scored, dtype=torch.float64) for b in blocks}
    gates: dict[str, torch.Tensor] = {}

    def hook_for(block: AttentionBlock):
        weight = dense_weight(model.get_submodule(block.output))  # (hidden, heads x head size)

        def hook(module, args):
            x = args[0]
            per_unit = x.reshape(*x.shape[:-1], block.scored, -1)
            if taylor:  # gate = 1 changes nothing; its gradient is the head's first-order importance
                gate = torch.ones(block.scored, dtype=x.dtype, device=x.device, requires_grad=True)
                gates[block.name] = gate
                return (((per_unit * gate[:, None]).reshape(x.shape)), *args[1:])
            with torch.no_grad():
                w = weight.reshape(weight.shape[0], block.scored, -1)
                parts = torch.einsum("nuk,duk->nud", per_unit.reshape(-1, *per_unit.shape[-2:]), w)
                sums[block.name] += parts.double().norm(dim=-1).sum(0).cpu()
            return None

        return hook

    handles = [model.get_submodule(b.output).register_forward_pre_hook(hook_for(b)) for b in blocks]
    with hooked_eval(model, handles):
        for chunk in token_windows(model, ids):
            if not taylor:
                with torch.no_grad():
                    model(input_ids=chunk[None])
                continue
            if chunk.numel() < 2:
                continue  # nothing to predict
            with torch.enable_grad():
                logits = getattr(model(input_ids=chunk[None]), "logits", None)
                if logits is None:
                    raise LlmshrinkError(
                        f"prune_heads.importance: 'taylor' needs LM logits; {type(model).__name__} has no LM "
                        "head; use 'output_norm' or 'magnitude'"
                    )
                wide = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 logits: fp32 loss
                loss = F.cross_entropy(logits[0, :-1].to(wide), chunk[1:], reduction="sum")
                found = [gates[b.name] for b in blocks]
                # autograd.grad, not backward: the model's own .grad fields stay untouched.
                for block, grad in zip(blocks, torch.autograd.grad(loss, found), strict=True):
                    sums[block.name] += grad.detach().double().abs().cpu()
            gates.clear()
    return sums if taylor else {name: total / max(ids.numel(), 1) for name, total in sums.items()}
