"""Every compression pass at about the same size, side by side: parameters, bytes, perplexity, CPU speed.

Applies each pass, through its registered apply, to a fresh copy of the built-in SmolLM2-135M, with
settings computed from the model so that the result holds about `--target` (0.7) of the base's
parameters (cluster and prune_magnitude keep their parameters' count but store fewer bytes: for them
the size on disk is what hits the target). No recovery training: the perplexity is the pass alone.
One run prints, with ratios against the dense base measured in the same run: unique parameters, the
size of the state dict as one .safetensors file, held-out perplexity on builtin:shakespeare (test),
greedy decode tokens/s and prefill ms on CPU (random prompts, batch 1), and the seconds each pass took.

    python benchmarks/passes.py --perm-iters 4                    # every pass, the README's table
    python benchmarks/passes.py --passes low_rank,prune_ffn --eval-tokens 1024 --latency-repeats 1

Blocks are picked evenly across depth where a pass compresses only some of them (kronecker, cluster):
no sensitivity search, so that the run stays short. prune_heads cannot reach the target alone (all of
attention is about 20% of SmolLM2): it keeps one key-value group per layer, the most it can remove.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from dataclasses import dataclass

import torch
from torch import nn

from llmshrink.context import Context
from llmshrink.decompose.factor_shapes import kronecker_params
from llmshrink.distill.data import token_ids
from llmshrink.eval.latency import measure_latency
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.size import count_bytes, count_params, safetensors_bytes
from llmshrink.models import load_base_model
from llmshrink.modules.kronecker import dense_weight
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec
from llmshrink.targeting import find_targets

PASSES = ("kronecker", "low_rank", "tensorize", "share_layers", "drop_layers", "prune_heads", "prune_ffn",
          "prune_magnitude", "cluster")
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
LINEARS = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
KRON_A, KRON_RANK = (32, 24), 4  # the offline recipe's factor shape and terms


@dataclass
class Plan:
    label: str  # the table row
    pass_name: str
    config: dict
    settings: str  # what the table says about the config


@dataclass
class Row:
    label: str
    settings: str
    params: int
    bytes: int
    ppl: float
    tokens_per_s: float
    prefill_ms: float
    seconds: float


def spread(n: int, total: int) -> list[int]:
    """n block indices evenly across 0..total-1 (the centre of each of n equal slices)."""
    return [int((i + 0.5) * total / n) for i in range(n)]


def clamp_count(value: float, total: int) -> int:
    return min(total, max(1, round(value)))


def numel(targets: list[tuple[str, nn.Module]]) -> int:
    return sum(dense_weight(module).numel() for _, module in targets)


def plans(model: nn.Module, args) -> list[Plan]:
    """Each pass's config, sized from the model so that it removes (1 - target) of the params (or bytes)."""
    blocks = model.model.layers
    n_blocks = len(blocks)
    remove = (1 - args.target) * count_params(model)  # parameters to remove
    remove_bytes = (1 - args.target) * count_bytes(model)
    mlp, linears = find_targets(model, MLP), find_targets(model, LINEARS)
    mlp_params, linear_params = numel(mlp), numel(linears)
    element = dense_weight(mlp[0][1]).element_size()
    # The share of every MLP projection's parameters to keep (low_rank / tensorize budget, prune_ffn ratio).
    keep = round(min(0.99, max(0.01, 1 - remove / mlp_params)), 4)
    calib = args.calibration_tokens
    out: list[Plan] = []
    for name in args.passes:
        if name == "kronecker":
            per_block = sum(
                dense_weight(m).numel() - kronecker_params(KRON_A, _b_shape(m), KRON_RANK)
                for n, m in mlp if n.startswith("model.layers.0.")
            )
            layers = spread(clamp_count(remove / per_block, n_blocks), n_blocks)
            config = {"targets": MLP, "layers": layers, "a_shape": list(KRON_A), "rank": KRON_RANK}
            settings = f"MLPs of {len(layers)} blocks, A {KRON_A[0]}x{KRON_A[1]}, rank {KRON_RANK}"
            out.append(Plan("kronecker", name, {**config, "permute": False}, f"{settings}, no permutation"))
            if args.perm_iters > 0:  # the same layers with KnGPT-2's permutation search, side by side
                out.append(Plan("kronecker+perm", name, {**config, "permute": True, "search_iters": args.perm_iters,
                                                         "search_restarts": 0},
                                f"{settings}, permutation search {args.perm_iters} iters"))
        elif name == "drop_layers":
            dropped = clamp_count(remove / count_params(blocks[0]), n_blocks - 1)
            config = {"keep": n_blocks - dropped, "select": "influence", "calibration_tokens": calib}
            out.append(Plan("drop_layers", name, config,
                            f"{n_blocks - dropped} of {n_blocks} blocks kept, least block influence removed"))
        elif name == "low_rank":
            config = {"targets": MLP, "ratio": keep}
            out.append(Plan("low_rank", name, config, f"all MLPs, ratio {keep}"))
            out.append(Plan("low_rank (activation-aware)", name,
                            {**config, "activation_aware": True, "calibration_tokens": calib},
                            f"all MLPs, ratio {keep}, whitened on {calib} tokens"))
        elif name == "tensorize":
            config = {"targets": MLP, "method": "tt", "ratio": keep}
            out.append(Plan("tensorize (tt)", name, config, f"all MLPs, tensor-train, budget {keep}"))
        elif name == "share_layers":
            shared = clamp_count(remove / count_params(blocks[0]), n_blocks - 1)
            config = {"mode": "select", "unique_blocks": n_blocks - shared, "select": "weights"}
            out.append(Plan("share_layers", name, config,
                            f"{n_blocks - shared} unique of {n_blocks} blocks (most similar weights)"))
        elif name == "prune_heads":
            groups = model.config.num_key_value_heads
            attention = sum(p.numel() for p in blocks[0].self_attn.parameters()) * n_blocks
            kept = min(groups, max(1, round(groups * (1 - remove / attention))))
            config = {"importance": "output_norm", "keep": kept / groups, "calibration_tokens": calib}
            out.append(Plan("prune_heads", name, config, f"{kept} of {groups} kv groups per layer, output norm"))
        elif name == "prune_ffn":
            config = {"importance": "activation", "ratio": keep, "multiple_of": 8, "calibration_tokens": calib}
            out.append(Plan("prune_ffn", name, config, f"{keep} of FFN params, activation importance"))
        elif name == "prune_magnitude":
            # Kept weights stay in their dtype, plus one mask bit per weight (dense or not).
            sparsity = round(min(0.99, (remove_bytes / linear_params + 1 / 8) / element), 4)
            config = {"targets": LINEARS, "sparsity": sparsity}
            out.append(Plan("prune_magnitude", name, config, f"all block linears, sparsity {sparsity}, one shot"))
        elif name == "cluster":
            saved = linear_params / n_blocks * (element - args.cluster_bits / 8)  # per block, codebook aside
            layers = spread(clamp_count(remove_bytes / saved, n_blocks), n_blocks)
            config = {"targets": LINEARS, "layers": layers, "bits": args.cluster_bits}
            out.append(Plan("cluster", name, config,
                            f"linears of {len(layers)} blocks, {args.cluster_bits}-bit indices"))
    return out


def _b_shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = dense_weight(module).shape
    return out_features // KRON_A[0], in_features // KRON_A[1]


def measure(model: nn.Module, tokenizer, eval_ids: torch.Tensor, args) -> dict:
    ppl = perplexity(model, eval_ids, args.window, args.window // 2, progress=False).ppl
    speed = measure_latency(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                            repeats=args.latency_repeats)
    return {"params": count_params(model), "bytes": safetensors_bytes(model), "ppl": ppl,
            "tokens_per_s": speed["tokens_per_s"], "prefill_ms": speed["prefill_ms"]}


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    print("\n| method | settings | params | params ratio | size MB | size ratio | perplexity | ppl ratio | "
          "decode tok/s | decode speed-up | prefill ms | prefill speed-up | pass s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.label} | {r.settings} | {r.params:,} | {r.params / base.params:.3f}x | {r.bytes / 1e6:.1f} | "
              f"{r.bytes / base.bytes:.3f}x | {r.ppl:.2f} | {r.ppl / base.ppl:.2f}x | {r.tokens_per_s:.1f} | "
              f"{r.tokens_per_s / base.tokens_per_s:.2f}x | {r.prefill_ms:.1f} | "
              f"{base.prefill_ms / r.prefill_ms:.2f}x | {r.seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    parser.add_argument("--target", type=float, default=0.7, help="params (or bytes) kept, as a share of the base")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (stride: half of it)")
    parser.add_argument("--calibration-tokens", type=int, default=2048, help="data-driven passes' tokens")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--perm-iters", type=int, default=0, help="also a kronecker+perm row with this many "
                        "permutation search iterations per layer (0: no such row; ~2 s per iteration and layer here)")
    parser.add_argument("--cluster-bits", type=int, default=8, choices=(1, 2, 4, 8))
    args = parser.parse_args()
    args.passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    unknown = sorted(set(args.passes) - set(PASSES))
    if unknown:
        parser.error(f"unknown passes {unknown}; choose from {','.join(PASSES)}")
    if not 0 < args.target < 1:
        parser.error(f"--target must be between 0 and 1, got {args.target}")
    torch.manual_seed(0)

    loaded = load_base_model("builtin:smollm2-135m")
    base, tokenizer = loaded.model, loaded.tokenizer
    eval_ids = token_ids(DataSpec(source="builtin:shakespeare", split="test", max_tokens=args.eval_tokens),
                         tokenizer)
    # One context for every pass: calibration text is tokenised once. The base is never modified (each
    # pass gets its own copy), so it serves as the frozen teacher.
    ctx = Context(tokenizer=tokenizer, teacher=base, seed=0, log=lambda _: None,
                  data=DataSpec(source="builtin:shakespeare", max_tokens=args.calibration_tokens))
    print(f"SmolLM2-135M: {count_params(base):,} params; target {args.target}x of params (bytes for cluster and "
          f"prune_magnitude); perplexity on {len(eval_ids)} tokens of builtin:shakespeare (test), window "
          f"{args.window}, no recovery; latency: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.latency_repeats}, {torch.get_num_threads()} CPU threads", flush=True)

    start = time.perf_counter()
    rows = [Row("base", "dense", **measure(base, tokenizer, eval_ids, args), seconds=0.0)]
    print(f"base: measured in {time.perf_counter() - start:.1f} s, perplexity {rows[0].ppl:.2f}", flush=True)
    for plan in plans(base, args):
        spec = get_pass(plan.pass_name)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        spec.apply(model, spec.config_cls.model_validate(plan.config), ctx)
        seconds = time.perf_counter() - start
        row = Row(plan.label, plan.settings, **measure(model, tokenizer, eval_ids, args), seconds=seconds)
        rows.append(row)
        print(f"{plan.label}: pass {seconds:.1f} s, measured in {time.perf_counter() - start - seconds:.1f} s; "
              f"params {row.params / rows[0].params:.3f}x, bytes {row.bytes / rows[0].bytes:.3f}x, "
              f"perplexity {row.ppl:.2f}; config {plan.config}", flush=True)
        del model
        gc.collect()
    print_table(rows)


if __name__ == "__main__":
    main()
