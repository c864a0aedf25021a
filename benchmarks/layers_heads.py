"""Blocks kept x attention heads kept on SmolLM2-135M: the shape of the "Comprehensive Study" seed's (N, H)
table for a decoder, with N read as blocks (its encoder table reads N as FFN neurons per layer: that is
benchmarks/encoders.py).

For each N, drop_layers removes the 30 - N blocks of least influence (1 - cos(block input, output) on
calibration text); then, for each H, prune_heads keeps H query heads per remaining layer (whole key-value
groups: SmolLM2 runs 3 query heads per group, so H is a multiple of 3) by output norm on the same text.
No recovery training. Each cell: held-out perplexity on builtin:shakespeare (test) and parameters, with
the dense base (N = 30, H = 9) measured in the same run.

    python benchmarks/layers_heads.py                                  # 3 x 3 cells, about 5 min on 2 cores
    python benchmarks/layers_heads.py --layers 30,26,22,18 --heads 9,6,3 --eval-tokens 2048
"""

from __future__ import annotations

import argparse
import copy

from llmshrink.context import Context
from llmshrink.distill.data import token_ids
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.size import count_params
from llmshrink.models import load_base_model
from llmshrink.passes.drop_layers import DropLayersConfig
from llmshrink.passes.drop_layers import apply as drop_layers
from llmshrink.passes.prune_heads import PruneHeadsConfig
from llmshrink.passes.prune_heads import apply as prune_heads
from llmshrink.specs import DataSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="30,24,18", help="N: blocks kept, one row each")
    parser.add_argument("--heads", default="9,6,3", help="H: query heads kept per layer, one column each")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (stride: half of it)")
    parser.add_argument("--calibration-tokens", type=int, default=2048, help="block influence and head importance")
    args = parser.parse_args()
    layer_counts = [int(n) for n in args.layers.split(",")]
    head_counts = [int(h) for h in args.heads.split(",")]

    loaded = load_base_model("builtin:smollm2-135m")
    base, tokenizer = loaded.model, loaded.tokenizer
    blocks, heads = base.config.num_hidden_layers, base.config.num_attention_heads
    for n in layer_counts:
        if not 1 <= n <= blocks:
            parser.error(f"--layers: {n} is not between 1 and {blocks}")
    eval_ids = token_ids(DataSpec(source="builtin:shakespeare", split="test", max_tokens=args.eval_tokens),
                         tokenizer)
    ctx = Context(tokenizer=tokenizer, seed=0, log=lambda _: None,
                  data=DataSpec(source="builtin:shakespeare", max_tokens=args.calibration_tokens))
    print(f"SmolLM2-135M: {blocks} blocks x {heads} heads ({base.config.num_key_value_heads} kv groups), "
          f"{count_params(base):,} params; perplexity on {len(eval_ids)} tokens of builtin:shakespeare (test), "
          f"window {args.window}; blocks by least influence, heads by output norm on {args.calibration_tokens} "
          "calibration tokens; no recovery", flush=True)

    cells: dict[tuple[int, int], tuple[float, int]] = {}
    for n in layer_counts:
        shallow = copy.deepcopy(base)
        if n < blocks:
            record = drop_layers(shallow, DropLayersConfig(keep=n), ctx)
            print(f"N={n}: removed blocks {record['removed']}", flush=True)
        for h in head_counts:
            model = copy.deepcopy(shallow)
            if h < heads:  # prune_heads refuses a count that is not whole kv groups, in one line
                prune_heads(model, PruneHeadsConfig(heads_per_layer=h), ctx)
            ppl = perplexity(model, eval_ids, args.window, args.window // 2, progress=False).ppl
            cells[n, h] = (ppl, count_params(model))
            print(f"N={n} H={h}: perplexity {ppl:.2f}, {count_params(model):,} params", flush=True)

    base_params = count_params(base)
    print("\nperplexity (params vs the base) by N = blocks kept (rows) and H = heads kept per layer (columns)\n")
    print("| N \\ H | " + " | ".join(str(h) for h in head_counts) + " |")
    print("|---|" + "---:|" * len(head_counts))
    for n in layer_counts:
        row = [f"{cells[n, h][0]:.2f} ({cells[n, h][1] / base_params:.2f}x)" for h in head_counts]
        print(f"| {n} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
