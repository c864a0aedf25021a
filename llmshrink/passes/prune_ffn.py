"""prune_ffn pass: remove whole FFN neurons by importance, physically shrinking the intermediate size.

Neuron j of a feed-forward block is row j of its input projection(s) and column j of its output
projection; the activation between them acts on each neuron alone, so dropping the row(s) and the
column removes exactly that neuron's contribution. Where those projections are is the model's Family
(llmshrink/families.py: `mlp`, `mlp_inputs`, `mlp_output`), e.g.:

    Llama / Gemma / SwiGLU   mlp.gate_proj, mlp.up_proj rows    mlp.down_proj columns
    GPT-2                    mlp.c_fc (Conv1D) output columns    mlp.c_proj (Conv1D) input rows
    BERT                     intermediate.dense rows             output.dense columns

Pruned layers become PrunedLinear (a plain nn.Linear of the smaller shape), which checkpoints rebuild
before loading, so each block may keep a different number of neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import family_of, iter_blocks, join
from llmshrink.importance import importance_scores
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.prune_ffn import PruneFfnConfig
from llmshrink.prune_units import check_dense, choose_blocks
from llmshrink.refit_output import refit, refit_sums
from llmshrink.targeting import dense_weight, hooked_eval, replace_module, token_windows


@dataclass(frozen=True)
class FfnBlock:
    name: str  # e.g. model.layers.3.mlp, or bert.encoder.layer.3 for BERT
    family: str  # the Family's name: llama | gemma | gpt2 | bert
    inputs: tuple[str, ...]  # layers whose output rows are the neurons
    output: str  # the layer whose input columns are the neurons


def apply(model, cfg: PruneFfnConfig, ctx: Context) -> PassRecord:
    blocks = find_ffn_blocks(model, cfg.layers, cfg.targets, cfg.exclude)
    sizes = {block.name: neuron_count(model, block) for block in blocks}
    scores, tokens = importance_scores(
        # Taylor needs a next-token loss, which an encoder family has not.
        "prune_ffn", cfg.importance, not family_of(model, "prune_ffn").causal, ctx, cfg.calibration_tokens,
        magnitude=lambda: magnitude_scores(model, blocks),
        calibration=lambda ids, taylor: calibration_scores(model, blocks, ids, taylor=taylor),
        alternatives="'activation' or 'magnitude'", model_name=type(model).__name__,
    )
    params = {block.name: block_params(model, block) for block in blocks}
    # Parameters per neuron, and those that stay whatever the count (the output bias).
    fixed = {block.name: _bias_numel(model.get_submodule(block.output)) for block in blocks}
    unit = {name: (params[name] - fixed[name]) / sizes[name] for name in params}
    if cfg.ratio is not None:
        kept = select_neurons(scores, cfg.ratio, cfg.scope, cfg.min_keep, cfg.multiple_of, unit, fixed)
    else:
        share = 0.5 if cfg.keep is None else cfg.keep
        kept = select_neurons(scores, share, cfg.scope, cfg.min_keep, cfg.multiple_of)

    sums, refit_tokens = {}, None
    if cfg.refit_output:  # measured on the dense blocks, before any is pruned
        shrinking = [block for block in blocks if kept[block.name].numel() < sizes[block.name]]
        outputs = {block.name: model.get_submodule(block.output) for block in shrinking}
        sums, refit_tokens = refit_sums(model, outputs, {block.name: kept[block.name] for block in shrinking},
                                        cfg.refit_tokens, ctx)
    layers = []
    for block in blocks:
        keep, total = kept[block.name], sizes[block.name]
        if keep.numel() < total:  # a block keeping every neuron stays as it is
            prune_block(model, block, keep)
            if block.name in sums:
                refit(model.get_submodule(block.output), *sums.pop(block.name))
        pruned = sorted(set(range(total)) - set(keep.tolist()))
        layers.append({
            "name": block.name, "kept": int(keep.numel()), "total": total,
            "params_before": params[block.name], "params_after": block_params(model, block), "pruned": pruned,
        })
        ctx.log(f"  {block.name}: {keep.numel()}/{total} neurons kept")
    return {
        "family": blocks[0].family,
        "importance": cfg.importance,
        "scope": cfg.scope,
        "calibration_tokens": tokens,
        "refit_tokens": refit_tokens,
        "neurons_before": sum(layer["total"] for layer in layers),
        "neurons_after": sum(layer["kept"] for layer in layers),
        "params_before": sum(layer["params_before"] for layer in layers),
        "params_after": sum(layer["params_after"] for layer in layers),
        "layers": layers,
    }


# --- structure -------------------------------------------------------------------------------------


def find_ffn_blocks(
    model: nn.Module, layers: list[int] | None = None, targets: str = ".*", exclude: str | None = None
) -> list[FfnBlock]:
    """The FFN blocks of the model's family that targets / exclude / layers choose, in model order."""
    family = family_of(model, "prune_ffn")
    found = [(index, join(block, family.mlp)) for index, block in iter_blocks(model, family, "prune_ffn")]
    chosen = choose_blocks(found, targets, exclude, layers, "prune_ffn", "FFN block", type(model).__name__)
    blocks = [
        FfnBlock(name, family.name, tuple(join(name, i) for i in family.mlp_inputs), join(name, family.mlp_output))
        for _, name in chosen
    ]
    for block in blocks:
        check_dense(model, (*block.inputs, block.output), "prune_ffn", "an FFN projection")
    return blocks


def neuron_count(model: nn.Module, block: FfnBlock) -> int:
    counts = {dense_weight(model.get_submodule(name)).shape[0] for name in block.inputs}
    counts.add(dense_weight(model.get_submodule(block.output)).shape[1])
    if len(counts) != 1:
        raise LlmshrinkError(f"prune_ffn: {block.name}: projections disagree on the neuron count: {sorted(counts)}")
    return counts.pop()


def block_params(model: nn.Module, block: FfnBlock) -> int:
    return sum(p.numel() for name in (*block.inputs, block.output) for p in model.get_submodule(name).parameters())


def _bias_numel(module: nn.Module) -> int:
    return module.bias.numel() if getattr(module, "bias", None) is not None else 0


def prune_block(model: nn.Module, block: FfnBlock, keep: torch.Tensor) -> None:
    """Keep neurons `keep` (sorted indices): rows of the input projections, columns of the output one."""
    for name in block.inputs:
        replace_module(model, name, PrunedLinear.from_linear(model.get_submodule(name), keep_out=keep))
    replace_module(model, block.output, PrunedLinear.from_linear(model.get_submodule(block.output), keep_in=keep))


# --- importance ------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_scores(model: nn.Module, blocks: list[FfnBlock]) -> dict[str, torch.Tensor]:
    """Product of the L2 norms of the neuron's input row(s) (gate and up for SwiGLU) and its output column."""
    scores = {}
    for block in blocks:
        score = dense_weight(model.get_submodule(block.output)).double().norm(dim=0)
        for name in block.inputs:
            score = score * dense_weight(model.get_submodule(name)).double().norm(dim=1)
        scores[block.name] = score.cpu()
    return scores


def calibration_scores(
    model: nn.Module, blocks: list[FfnBlock], ids: torch.Tensor, taylor: bool
) -> dict[str, torch.Tensor]:
    """Mean |a| (activation) or Σ|a·∂L/∂a| (taylor) per neuron, a being the output projection's input."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    sums = {block.name: torch.zeros(neuron_count(model, block), dtype=torch.float64) for block in blocks}
    acts: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args):
            x = args[0]
            if taylor and not x.requires_grad:
                # A frozen model builds no graph: make the first activation a leaf; later ones depend on it.
                x = x.detach().requires_grad_()
            acts[name] = x
            return (x, *args[1:])

        return hook

    handles = [model.get_submodule(b.output).register_forward_pre_hook(capture(b.name)) for b in blocks]
    counted = 0
    with hooked_eval(model, handles):
        for chunk in token_windows(model, ids):
            if taylor and chunk.numel() < 2:
                continue  # nothing to predict
            with torch.set_grad_enabled(taylor):
                out = model(input_ids=chunk[None])
                if taylor:
                    logits = getattr(out, "logits", None)
                    if logits is None:
                        raise LlmshrinkError(
                            f"prune_ffn.importance: 'taylor' needs LM logits; {type(model).__name__} has no LM "
                            "head; use 'activation' or 'magnitude'"
                        )
                    loss = F.cross_entropy(logits[0, :-1].float(), chunk[1:], reduction="sum")
                    found = [acts[b.name] for b in blocks]
                    grads = torch.autograd.grad(loss, found, allow_unused=True)
                    for block, act, grad in zip(blocks, found, grads, strict=True):
                        if grad is not None:
                            sums[block.name] += _token_sum((act * grad).abs())
                else:
                    for block in blocks:
                        sums[block.name] += _token_sum(acts[block.name].abs())
            counted += chunk.numel()
            acts.clear()
    return sums if taylor else {name: total / max(counted, 1) for name, total in sums.items()}


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().reshape(-1, x.shape[-1]).sum(0).cpu()


# --- budget ----------------------------------------------------------------------------------------


def select_neurons(
    scores: dict[str, torch.Tensor],
    share: float,
    scope: str,
    min_keep: int = 1,
    multiple_of: int = 1,
    unit_cost: dict[str, float] | None = None,
    fixed: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Sorted indices of the neurons each block keeps.

    Budget: the kept neurons cost at most `share` of the blocks' cost, where a block costs
    n·unit_cost + fixed (default 1 and 0: a share of neurons; parameters per neuron and the output
    bias: a share of parameters). per_layer applies it to each block alone; global spends it across
    blocks, best score first, after each block has its `min_keep`. Neurons are taken in groups of
    `multiple_of` (by score), so kept counts are multiples of it (or the whole block).
    """
    unit_cost = unit_cost or dict.fromkeys(scores, 1.0)
    fixed = fixed or dict.fromkeys(scores, 0.0)

    def budget(names) -> float:
        return share * sum(scores[n].numel() * unit_cost[n] + fixed[n] for n in names) - sum(fixed[n] for n in names)

    if scope == "per_layer":
        return {
            name: _greedy({name: scores[name]}, unit_cost, budget([name]), min_keep, multiple_of)[name]
            for name in scores
        }
    return _greedy(scores, unit_cost, budget(list(scores)), min_keep, multiple_of)


def _greedy(scores, unit_cost, budget: float, min_keep: int, multiple_of: int) -> dict[str, torch.Tensor]:
    order, taken, chunks = {}, {}, []
    spent = 0.0
    for position, (name, score) in enumerate(scores.items()):
        score = score.double().cpu()
        n = score.numel()
        order[name] = torch.sort(score, descending=True, stable=True).indices
        mean = score.mean()
        ranked = score[order[name]] / (mean if mean > 0 else 1.0)  # comparable across blocks
        taken[name] = min(n, -(-min_keep // multiple_of) * multiple_of)
        spent += taken[name] * unit_cost[name]
        starts = list(range(taken[name], n, multiple_of))
        if starts:
            means = torch.stack([ranked[s : s + multiple_of].mean() for s in starts])
            means = torch.cummin(means, 0).values  # never rank a later group of a block above an earlier one
            for mean_score, start in zip(means.tolist(), starts, strict=True):
                chunks.append((-mean_score, position, start, name, min(multiple_of, n - start)))
    chunks.sort()  # best group first; ties: earlier block, then earlier group
    closed = set()
    slack = 1e-9 * max(1.0, abs(budget))  # float rounding of share x size
    for _, _, start, name, size in chunks:
        if name in closed:
            continue
        cost = size * unit_cost[name]
        if start == taken[name] and spent + cost <= budget + slack:
            taken[name] += size
            spent += cost
        else:
            closed.add(name)  # a block keeps a prefix of its ranking: no later group either
    return {name: order[name][: taken[name]].sort().values for name in scores}
