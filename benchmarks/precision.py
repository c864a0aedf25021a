"""Precision side by side (the "Comprehensive Study" table): fp32, fp16, bf16, int8-dynamic, nf4, and with Kronecker.

Each row is the built-in SmolLM2-135M through the quantize pass: int8-dynamic on the blocks' layers (the tied
lm_head stays fp32) or on the lm_head too (+head: untied, the embedding stays fp32); bitsandbytes nf4 on the
blocks' layers; and those after the offline recipe's Kronecker layers (no recovery; they stay fp32). Measured in
one run against the fp32 base: size of the checkpoint's weights on disk, seconds the passes took, seconds
load_checkpoint takes, CPU prefill ms and greedy decode tokens/s (batch 1, prefill excluded), held-out perplexity
on builtin:shakespeare (test). `mixed` picks nf4, int8 or fp32 per layer under a 0.2x byte budget.

Load times are warm: each checkpoint is loaded once untimed (file pages cached, lazy imports and kernels
initialised) right before its timed load, so the first row measured (fp32) pays no cold-start cost the
others do not.

    python benchmarks/precision.py                     # about 10 min on 2 cores
    python benchmarks/precision.py --methods fp32,int8-dynamic --eval-tokens 1024 --latency-repeats 1
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.distill.data import token_ids
from llmshrink.eval.latency import measure_latency
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.size import dir_size
from llmshrink.models import load_base_model
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec

KRONECKER = ("kronecker", {"targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", "a_shape": (32, 24),
                          "rank": 4, "permute": False, "layers": [5, 7, 10, 12, 13, 14, 16, 17, 18, 19, 26]})
NF4 = ("quantize", {"method": "bnb-nf4"})
# Per layer nf4, int8 or fp32, chosen by measured calibration perplexity, in 0.2x the fp32 bytes of the blocks'
# layers (between all-nf4, ~0.13x, and all-int8, ~0.26x).
MIXED = ("quantize", {"method": "mixed", "budget": 0.2, "calibration_tokens": 256})
INT8_ALL = ("quantize", {"method": "int8-dynamic", "targets": r".*\.\d+\..*|lm_head", "tied_embeddings": "untie"})
# Each row: the passes applied to the fp32 base, in order (the Kronecker layers are the offline recipe's).
METHODS = {
    "fp32": [],
    "fp16": [("quantize", {"method": "fp16"})],
    "bf16": [("quantize", {"method": "bf16"})],
    "int8-dynamic": [("quantize", {"method": "int8-dynamic"})],
    "int8-dynamic+head": [INT8_ALL],
    "kronecker+int8-dynamic+head": [KRONECKER, INT8_ALL],
    "nf4": [NF4],
    "mixed": [MIXED],
    "kronecker+nf4": [KRONECKER, NF4],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (stride: half of it)")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")

    loaded = load_base_model("builtin:smollm2-135m")
    base, tokenizer = loaded.model, loaded.tokenizer
    eval_ids = token_ids(DataSpec(source="builtin:shakespeare", split="test", max_tokens=args.eval_tokens),
                         tokenizer)
    # Calibration text for `mixed`: the training plays, never the evaluation ones.
    ctx = Context(tokenizer=tokenizer, data=DataSpec(source="builtin:shakespeare", split="train"), seed=0,
                  log=lambda _: None)
    print(f"SmolLM2-135M; perplexity on {len(eval_ids)} tokens of builtin:shakespeare (test), window {args.window}; "
          f"latency: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of "
          f"{args.latency_repeats}, {torch.get_num_threads()} CPU threads", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["fp32"] + [m for m in methods if m != "fp32"]:  # fp32 first: the baseline
            model = copy.deepcopy(base)
            start = time.perf_counter()
            for pass_name, config in METHODS[method]:
                spec = get_pass(pass_name)
                spec.apply(model, spec.config_cls.model_validate(config), ctx)
            seconds = time.perf_counter() - start
            out = save_checkpoint(model, tokenizer, Path(tmp) / method, recipe_text="name: bench\n",
                                  manifest={"name": method}, model_card="# bench\n")
            load_checkpoint(out)  # warm-up, untimed: see the docstring
            start = time.perf_counter()
            reloaded = load_checkpoint(out)
            load_seconds = time.perf_counter() - start
            del model
            ppl = perplexity(reloaded, eval_ids, args.window, args.window // 2, progress=False).ppl
            speed = measure_latency(reloaded, tokenizer, prompt_tokens=args.prompt_tokens,
                                    new_tokens=args.new_tokens, repeats=args.latency_repeats)
            rows.append({"method": method, "bytes": dir_size(out, weights_only=True), "seconds": seconds,
                         "load": load_seconds, "prefill_ms": speed["prefill_ms"],
                         "tokens_per_s": speed["tokens_per_s"], "ppl": ppl})
            print(f"{method}: perplexity {ppl:.2f}, {rows[-1]['bytes'] / 1e6:.1f} MB, "
                  f"{speed['tokens_per_s']:.1f} tokens/s", flush=True)
            del reloaded

    b = rows[0]
    print("\n| method | size MB | size ratio | compress s | load s | load ratio | prefill ms | prefill speed-up | "
          "decode tok/s | decode speed-up | perplexity | ppl ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in [row for row in rows if row["method"] in methods or row is b]:
        print(f"| {r['method']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / b['bytes']:.3f}x | {r['seconds']:.1f} | "
              f"{r['load']:.2f} | {r['load'] / b['load']:.2f}x | {r['prefill_ms']:.1f} | "
              f"{b['prefill_ms'] / r['prefill_ms']:.2f}x | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {r['ppl']:.2f} | {r['ppl'] / b['ppl']:.3f}x |")


if __name__ == "__main__":
    main()
