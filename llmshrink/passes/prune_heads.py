"""prune_heads pass: remove whole attention heads by importance, physically shrinking the projections.

Query head h owns rows h·d..(h+1)·d of the query projection and the same columns of the output
projection (d: head size); its key/value rows belong to its key-value group. The unit of pruning is
a key-value group with its query heads (one head when there is no GQA), so `num_key_value_groups`
stays what the config says:

    GPT-2     attn.c_attn (Conv1D: q | k | v blocks) output columns    attn.c_proj input rows
    Llama     self_attn.q_proj rows, k_proj / v_proj rows per group    self_attn.o_proj columns
    BERT      attention.self.query / key / value rows                  attention.output.dense columns

Pruned layers become PrunedLinear. GPT-2 splits c_attn's output by `split_size`, so the attention
module's head attributes are set with `set_module_attrs`, which checkpoints record and restore;
Llama and BERT reshape by head size (-1 heads) and need no attribute at forward time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.importance import importance_scores
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.prune_heads import PruneHeadsConfig
from llmshrink.targeting import dense_weight, is_dense_layer, layer_index, replace_module, set_module_attrs

SUPPORTED = (
    "GPT-2 (GPT2Attention: c_attn/c_proj), Llama (LlamaAttention: q/k/v/o_proj, GQA), "
    "BERT (BertSelfAttention: query/key/value, attention.output.dense)"
)


@dataclass(frozen=True)
class AttentionBlock:
    name: str  # the attention module whose head attributes change (GPT2Attention, LlamaAttention, ...)
    family: str  # gpt2 | llama | bert
    heads: int  # query heads now
    group: int  # query heads per key-value group: the unit of pruning
    head_dim: int
    qkv: tuple[str, ...]  # c_attn | q_proj, k_proj, v_proj | query, key, value
    output: str  # c_proj | o_proj | attention.output.dense

    @property
    def units(self) -> int:
        return self.heads // self.group


def apply(model, cfg: PruneHeadsConfig, ctx: Context) -> PassRecord:
    blocks = find_attention_blocks(model, cfg.layers)
    if cfg.heads_per_layer is not None:
        _check_heads_per_layer(cfg.heads_per_layer, blocks)
    scores, tokens = importance_scores(
        "prune_heads", cfg.importance, blocks[0].family == "bert", ctx, cfg.calibration_tokens,
        magnitude=lambda: magnitude_scores(model, blocks),
        calibration=lambda ids, taylor: calibration_scores(model, blocks, ids, taylor=taylor),
        alternatives="'output_norm' or 'magnitude'", model_name=type(model).__name__,
    )
    normalize = cfg.normalize
    if normalize == "auto":
        normalize = "none" if cfg.importance == "taylor" else "layer_mean"
    if cfg.heads_per_layer is not None:
        kept = {b.name: _top(scores[b.name], cfg.heads_per_layer // b.group) for b in blocks}
    else:
        kept = select_units(scores, 0.5 if cfg.keep is None else cfg.keep, cfg.scope, normalize)

    model_params = _params(model)
    layers = []
    for block in blocks:
        keep = kept[block.name]
        params = block_params(model, block)
        if keep.numel() < block.units:  # a layer keeping every head stays as it is
            prune_block(model, block, keep)
        removed = sorted(set(range(block.units)) - set(keep.tolist()))
        layers.append({
            "name": block.name,
            "layer": layer_index(block.name),
            "heads_kept": int(keep.numel()) * block.group,
            "heads_total": block.heads,
            "kv_groups_kept": int(keep.numel()),
            "kv_groups_total": block.units,
            # Indices as the layer was before this pass (a second prune_heads counts from its survivors).
            "removed_heads": [u * block.group + r for u in removed for r in range(block.group)],
            "removed_kv_groups": removed,
            "scores": [float(f"{s:.6g}") for s in scores[block.name].tolist()],  # per kv group
            "params_before": params,
            "params_after": block_params(model, block),
        })
        ctx.log(f"  {block.name}: {layers[-1]['heads_kept']}/{block.heads} heads kept")
    return {
        "family": blocks[0].family,
        "importance": cfg.importance,
        "scope": "per_layer" if cfg.heads_per_layer is not None else cfg.scope,
        "normalize": normalize if cfg.scope == "global" and cfg.heads_per_layer is None else None,
        "calibration_tokens": tokens,
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


def find_attention_blocks(model: nn.Module, layers: list[int] | None = None) -> list[AttentionBlock]:
    """Every self-attention of a supported family, in model order (only blocks `layers` when given)."""
    blocks = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "GPT2Attention" and not module.is_cross_attention:
            block = AttentionBlock(name, "gpt2", 0, 1, module.head_dim, (f"{name}.c_attn",), f"{name}.c_proj")
        elif kind == "LlamaAttention":
            qkv = tuple(f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj"))
            block = AttentionBlock(name, "llama", 0, module.num_key_value_groups, module.head_dim, qkv,
                                   f"{name}.o_proj")
        elif kind == "BertSelfAttention" and name.endswith(".self"):
            qkv = tuple(f"{name}.{p}" for p in ("query", "key", "value"))
            block = AttentionBlock(name, "bert", 0, 1, module.attention_head_size, qkv,
                                   f"{name[: -len('.self')]}.output.dense")
        else:
            continue
        blocks.append(block)
    if not blocks:
        raise LlmshrinkError(f"prune_heads: {type(model).__name__} is not supported; supported: {SUPPORTED}")
    if layers is not None:
        present = [layer_index(block.name) for block in blocks]
        blocks = [block for block in blocks if layer_index(block.name) in layers]
        if not blocks:
            raise LlmshrinkError(
                f"prune_heads.layers: {layers} match no attention block; {type(model).__name__} has blocks {present}"
            )
    return [_with_head_count(model, block) for block in blocks]


def _with_head_count(model: nn.Module, block: AttentionBlock) -> AttentionBlock:
    """The block with its head count read from the projection shapes (which earlier pruning changed)."""
    for name in (*block.qkv, block.output):
        module = model.get_submodule(name)
        if not is_dense_layer(module):
            raise LlmshrinkError(
                f"prune_heads: {name} is a {type(module).__name__}, not Linear/Conv1D; "
                "run prune_heads before passes that replace it"
            )
    width = dense_weight(model.get_submodule(block.output)).shape[1]
    q_rows = dense_weight(model.get_submodule(block.qkv[0])).shape[0] // (3 if block.family == "gpt2" else 1)
    kv_rows = q_rows if block.family == "gpt2" else dense_weight(model.get_submodule(block.qkv[1])).shape[0]
    heads = width // block.head_dim
    if q_rows != width or width % block.head_dim or kv_rows * block.group != width:
        raise LlmshrinkError(
            f"prune_heads: {block.name}: projections disagree on the heads: query {q_rows}, key/value {kv_rows}, "
            f"output {width} features, head size {block.head_dim}, {block.group} query heads per kv group"
        )
    return AttentionBlock(block.name, block.family, heads, block.group, block.head_dim, block.qkv, block.output)


def _check_heads_per_layer(count: int, blocks: list[AttentionBlock]) -> None:
    for block in blocks:
        if count > block.heads:
            raise LlmshrinkError(
                f"prune_heads.heads_per_layer: {count} exceeds the {block.heads} heads of {block.name}"
            )
        if count % block.group:
            raise LlmshrinkError(
                f"prune_heads.heads_per_layer: {count} is not a multiple of {block.group}, the query heads per "
                f"kv group of {block.name} (heads are removed with their kv group)"
            )


def block_params(model: nn.Module, block: AttentionBlock) -> int:
    return sum(p.numel() for name in (*block.qkv, block.output) for p in model.get_submodule(name).parameters())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def head_rows(block: AttentionBlock, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query feature indices, key/value feature indices) of the kept units, in order."""
    d, g = block.head_dim, block.group
    units = torch.as_tensor(units).long()
    heads = (units[:, None] * g + torch.arange(g)).reshape(-1)
    q = (heads[:, None] * d + torch.arange(d)).reshape(-1)
    kv = (units[:, None] * d + torch.arange(d)).reshape(-1)
    return q, kv


def prune_block(model: nn.Module, block: AttentionBlock, keep: torch.Tensor) -> None:
    """Keep the key-value groups `keep` (sorted indices) and their query heads."""
    q, kv = head_rows(block, keep)
    attention = model.get_submodule(block.name)
    if block.family == "gpt2":
        width = block.heads * block.head_dim
        fused = torch.cat([q, q + width, q + 2 * width])  # the same heads in the q, k and v blocks
        replace_module(model, block.qkv[0], PrunedLinear.from_linear(model.get_submodule(block.qkv[0]), keep_out=fused))
        set_module_attrs(attention, num_heads=int(keep.numel()), split_size=int(q.numel()))
    elif block.family == "llama":
        for name, rows in zip(block.qkv, (q, kv, kv), strict=True):
            replace_module(model, name, PrunedLinear.from_linear(model.get_submodule(name), keep_out=rows))
    else:
        for name in block.qkv:
            replace_module(model, name, PrunedLinear.from_linear(model.get_submodule(name), keep_out=q))
        set_module_attrs(attention, num_attention_heads=int(keep.numel()), all_head_size=int(q.numel()))
    replace_module(model, block.output, PrunedLinear.from_linear(model.get_submodule(block.output), keep_in=q))


# --- importance ------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_scores(model: nn.Module, blocks: list[AttentionBlock]) -> dict[str, torch.Tensor]:
    """L2 norm of all of a unit's weights: its query, key and value rows and its output columns."""
    scores = {}
    for block in blocks:
        squares = torch.zeros(block.units, dtype=torch.float64)
        d, g = block.head_dim, block.group
        out = dense_weight(model.get_submodule(block.output)).double()
        squares += out.reshape(out.shape[0], block.units, g * d).pow(2).sum((0, 2)).cpu()
        if block.family == "gpt2":
            w = dense_weight(model.get_submodule(block.qkv[0])).double()
            squares += w.reshape(3, block.units, d, -1).pow(2).sum((0, 2, 3)).cpu()
        else:
            for name, per_unit in zip(block.qkv, (g * d, d, d), strict=True):
                w = dense_weight(model.get_submodule(name)).double()
                squares += w.reshape(block.units, per_unit, -1).pow(2).sum((1, 2)).cpu()
        scores[block.name] = squares.sqrt()
    return scores


def calibration_scores(
    model: nn.Module, blocks: list[AttentionBlock], ids: torch.Tensor, taylor: bool
) -> dict[str, torch.Tensor]:
    """Per unit: mean over tokens of ‖its output-projected contribution‖ (output_norm), or the sum over
    calibration windows of |∂L/∂g| for a gate g scaling its heads' outputs (taylor; L: summed next-token loss).
    """
    ids = torch.as_tensor(ids).reshape(-1).long()
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or ids.numel()
    window = max(1, min(256, ids.numel(), positions))
    device = next(model.parameters()).device
    sums = {b.name: torch.zeros(b.units, dtype=torch.float64) for b in blocks}
    gates: dict[str, torch.Tensor] = {}

    def hook_for(block: AttentionBlock):
        weight = dense_weight(model.get_submodule(block.output))  # (hidden, heads x head size)

        def hook(module, args):
            x = args[0]
            per_unit = x.reshape(*x.shape[:-1], block.units, block.group * block.head_dim)
            if taylor:  # gate = 1 changes nothing; its gradient is the head's first-order importance
                gate = torch.ones(block.units, dtype=x.dtype, device=x.device, requires_grad=True)
                gates[block.name] = gate
                return (((per_unit * gate[:, None]).reshape(x.shape)), *args[1:])
            with torch.no_grad():
                w = weight.reshape(weight.shape[0], block.units, -1)
                parts = torch.einsum("nuk,duk->nud", per_unit.reshape(-1, *per_unit.shape[-2:]), w)
                sums[block.name] += parts.double().norm(dim=-1).sum(0).cpu()
            return None

        return hook

    handles = [model.get_submodule(b.output).register_forward_pre_hook(hook_for(b)) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window].to(device)
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
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums if taylor else {name: total / max(ids.numel(), 1) for name, total in sums.items()}


# --- budget ----------------------------------------------------------------------------------------


def select_units(
    scores: dict[str, torch.Tensor], keep: float, scope: str, normalize: str = "layer_mean"
) -> dict[str, torch.Tensor]:
    """Sorted indices of the units each layer keeps: floor(keep x units), at least one per layer.

    per_layer counts each layer alone; global keeps floor(keep x all units): each layer's best unit,
    then the best of the rest across layers (scores divided by their layer's mean, unless normalize
    is "none"; ties: earlier layer, then lower index).
    """

    def count(n: int) -> int:
        return max(1, math.floor(keep * n + 1e-9))  # 1e-9: 0.7 x 10 is 6.999...

    if scope == "per_layer":
        return {name: _top(score, count(score.numel())) for name, score in scores.items()}
    taken = {name: 1 for name in scores}
    rest = []
    for position, (name, score) in enumerate(scores.items()):
        score = score.double().cpu()
        mean = score.mean()
        if normalize == "layer_mean" and mean > 0:
            score = score / mean
        ranked = torch.sort(score, descending=True, stable=True).values
        rest += [(-value, position, rank, name) for rank, value in enumerate(ranked[1:].tolist(), start=1)]
    rest.sort()
    budget = count(sum(score.numel() for score in scores.values())) - len(scores)
    for _, _, _, name in rest[: max(0, budget)]:
        taken[name] += 1  # a layer's units are taken in its own order, so its count is all that matters
    return {name: _top(score, taken[name]) for name, score in scores.items()}


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the `count` best units (ties keep the lower index)."""
    return torch.sort(score, descending=True, stable=True).indices[:count].sort().values
