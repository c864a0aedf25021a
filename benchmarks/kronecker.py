"""Kronecker with permutation vs without vs truncated SVD at the same parameter count, on real weights.

Replaces the MLP projections (gate/up/down) of the chosen blocks of the built-in SmolLM2-135M with
each method in turn and prints, side by side from one run: parameters, mean relative reconstruction
error, held-out perplexity (no recovery training), and the CPU time of one layer's forward against
the dense layer it replaces (decode batch 1, and a prefill batch).

    python benchmarks/kronecker.py                       # defaults below
    python benchmarks/kronecker.py --blocks 12,13,14 --rank 4 --a-shape 32,24 --eval-tokens 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from llmshrink.decompose.kronecker_search import search_permutations
from llmshrink.distill.data import token_ids
from llmshrink.eval.perplexity import perplexity
from llmshrink.models import load_base_model
from llmshrink.modules.kronecker import KroneckerLinear, dense_weight
from llmshrink.specs import DataSpec
from llmshrink.targeting import replace_module

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SVDLinear(nn.Module):
    """Truncated SVD baseline: W ≈ U_k (S_k V_kᵀ), two thin matmuls."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        u, s, vh = torch.linalg.svd(dense_weight(linear).float(), full_matrices=False)
        self.down = nn.Parameter((s[:rank, None] * vh[:rank]).contiguous())  # (k, in)
        self.up = nn.Parameter(u[:, :rank].contiguous())  # (out, k)
        self.bias = linear.bias

    def to_dense(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, x):
        y = (x @ self.down.T) @ self.up.T
        return y if self.bias is None else y + self.bias


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def rel_error(new: nn.Module, old: nn.Module) -> float:
    w = dense_weight(old).float()
    return float((new.to_dense() - w).norm() / w.norm())


def build(method: str, linear: nn.Linear, a_shape, rank: int, iters: int) -> nn.Module:
    w = dense_weight(linear)
    b_shape = (w.shape[0] // a_shape[0], w.shape[1] // a_shape[1])
    if method == "kronecker+perm":
        found = search_permutations(w, a_shape, b_shape, rank, iters=iters)
        return KroneckerLinear.from_linear(linear, a_shape, b_shape, rank, found.row_perm, found.col_perm)
    if method == "kronecker":
        return KroneckerLinear.from_linear(linear, a_shape, b_shape, rank)
    kron_params = rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
    svd_rank = max(1, round(kron_params / (w.shape[0] + w.shape[1])))
    return SVDLinear(linear, svd_rank)


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def forward_times(dense: nn.Linear, compressed: nn.Module, prefill: int) -> dict[str, float]:
    n = dense.in_features
    decode, batch = torch.randn(1, 1, n), torch.randn(1, prefill, n)
    return {
        "decode_dense_ms": median_ms(lambda: dense(decode)),
        "decode_ms": median_ms(lambda: compressed(decode)),
        "prefill_dense_ms": median_ms(lambda: dense(batch), 10),
        "prefill_ms": median_ms(lambda: compressed(batch), 10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="5,7,10,12,13,14,16,17,18,19,26", help="default: the offline recipe's choice")
    parser.add_argument("--a-shape", default="32,24")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--iters", type=int, default=4, help="permutation search iterations per layer")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=256)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    a_shape = tuple(int(x) for x in args.a_shape.split(","))

    loaded = load_base_model("builtin:smollm2-135m")
    model = loaded.model
    ids = token_ids(DataSpec(source="builtin:shakespeare", split="test", max_tokens=args.eval_tokens),
                    loaded.tokenizer)
    names = [f"model.layers.{b}.mlp.{p}" for b in blocks for p in PROJECTIONS]
    originals = {name: model.get_submodule(name) for name in names}

    def ppl() -> float:
        return perplexity(model, ids, args.window, args.window // 2, progress=False).ppl

    print(f"SmolLM2-135M, MLPs of blocks {blocks} ({len(names)} layers), A={a_shape}, rank {args.rank}; "
          f"held-out perplexity on {len(ids)} tokens of builtin:shakespeare (test), window {args.window}")
    rows = [("dense (base)", sum(params(m) for m in originals.values()), 0.0, ppl(), 0.0)]
    timings = {}
    for method in ("kronecker+perm", "kronecker", "svd"):
        start = time.perf_counter()
        errors, total = [], 0
        for name, linear in originals.items():
            new = build(method, linear, a_shape, args.rank, args.iters)
            errors.append(rel_error(new, linear))
            total += params(new)
            replace_module(model, name, new)
        seconds = time.perf_counter() - start
        rows.append((method, total, statistics.mean(errors), ppl(), seconds))
        timings[method] = forward_times(originals[names[0]], model.get_submodule(names[0]), args.prefill)
        for name, linear in originals.items():
            replace_module(model, name, linear)

    print("\n| method | params (replaced layers) | mean rel. error | perplexity | build s |")
    print("|---|---:|---:|---:|---:|")
    for method, total, err, value, seconds in rows:
        print(f"| {method} | {total:,} | {err:.4f} | {value:.2f} | {seconds:.1f} |")
    first = names[0]
    shape = tuple(dense_weight(originals[first]).shape)
    print(f"\nOne-layer forward on CPU ({first}, {shape[0]}x{shape[1]}), median ms, ratio = dense / compressed:")
    print(f"| method | decode b=1 ms | dense ms | speed-up | prefill b=1x{args.prefill} ms | dense ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, t in timings.items():
        print(f"| {method} | {t['decode_ms']:.4f} | {t['decode_dense_ms']:.4f} | "
              f"{t['decode_dense_ms'] / t['decode_ms']:.2f}x | {t['prefill_ms']:.3f} | {t['prefill_dense_ms']:.3f} | "
              f"{t['prefill_dense_ms'] / t['prefill_ms']:.2f}x |")


if __name__ == "__main__":
    main()
