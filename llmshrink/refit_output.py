"""Least-squares refit of a pruned block's output projection: what the removed units did, put back.

Removing FFN neurons deletes their share of the block's output, y = W h. The kept neurons' activations
h_K are correlated with the removed ones, so re-solving the output projection on calibration text,

    W', b' = argmin  Σ_tokens || W' h_K + b' - (W h + b) ||²   (+ a small ridge term),

recovers much of it before any training (the compensation step of FLAP, SlimGPT and ZipLM, as one
least-squares solve per block). Only the sums A = Σ h_K h_Kᵀ and B = Σ h_K yᵀ are kept: k² + k·d numbers
per block, whatever the number of calibration tokens. A layer without a bias stays without one (its
model's config says so); with one, the bias is refitted too.

On SmolLM2-135M at 0.8x params (prune_ffn keep 0.66, global, activation importance), before recovery:
Python docs perplexity 63.55 -> 54.48, held-out Shakespeare 87.50 -> 71.61 (the default 8,192 tokens of the
offline recipes' mix; 16,384 gave 51.2 / 69.4). After 50 steps of distillation the gain is almost gone (46.27
against 46.61): README, benchmarks/recovery.py.
"""

from __future__ import annotations

import torch
from torch import nn

from llmshrink.context import Context
from llmshrink.targeting import hooked_eval

# Ridge weight, relative to the mean diagonal of A: keeps the solve stable where kept activations are
# nearly collinear. Measured on the setting above (16,384 tokens): 1e-4 gave 51.2, 1e-2 gave 57.0.
DAMPING = 1e-4


def spread_windows(ids: torch.Tensor, tokens: int, window: int) -> torch.Tensor:
    """`tokens` of the 1-D stream `ids` as rows of `window` tokens, evenly spaced over the whole stream (a
    mix of corpus and teacher samples is represented by both halves, not by the first)."""
    rows = ids[: ids.numel() // window * window].reshape(-1, window)
    if rows.shape[0] == 0:
        return ids[None, :window]
    count = max(1, min(rows.shape[0], tokens // window))
    picks = torch.linspace(0, rows.shape[0] - 1, count).round().long().unique()
    return rows[picks]


def refit_sums(
    model: nn.Module, layers: dict[str, nn.Module], kept: dict[str, torch.Tensor], tokens: int, ctx: Context
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """(output_sums on `tokens` of the recipe's data, spread over all of it, in windows the model can
    read; the tokens used)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 256
    windows = spread_windows(ctx.train_token_ids(), tokens, min(256, positions))
    ctx.log(f"  refitting {len(layers)} output projections on {windows.numel()} tokens")
    return output_sums(model, layers, kept, windows), windows.numel()


@torch.no_grad()
def output_sums(
    model: nn.Module, layers: dict[str, nn.Module], kept: dict[str, torch.Tensor], windows: torch.Tensor,
    batch_size: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer name: (A, B) in float64, accumulated over `windows` (rows of token ids) run through `model`
    with each dense layer as it is; h_K gets a constant 1 appended where the layer has a bias."""
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, keep: torch.Tensor, bias: bool):
        def hook(module, args, output):
            h = args[0].reshape(-1, args[0].shape[-1])[:, keep.to(args[0].device)].double()
            if bias:
                h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
            y = output.reshape(-1, output.shape[-1]).double()
            a, b = h.T @ h, h.T @ y
            if name in sums:
                sums[name][0].add_(a.cpu())
                sums[name][1].add_(b.cpu())
            else:
                sums[name] = (a.cpu(), b.cpu())

        return hook

    handles = [layer.register_forward_hook(record(name, kept[name], getattr(layer, "bias", None) is not None))
               for name, layer in layers.items()]
    device = next(model.parameters()).device
    with hooked_eval(model, handles):
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(device))
    return sums


@torch.no_grad()
def refit(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    """Set `layer` (an nn.Linear over the kept inputs) to the ridge least-squares solution of (A, B)."""
    ridge = DAMPING * a.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(a + ridge * torch.eye(a.shape[0], dtype=a.dtype), b)  # (k [+1]) x out
    if layer.bias is not None:
        layer.bias.copy_(solution[-1])
        solution = solution[:-1]
    layer.weight.copy_(solution.T.to(layer.weight.dtype))
