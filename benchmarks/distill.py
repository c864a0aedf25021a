"""Which recovery wins at equal tokens: CE fine-tuning, logit KD, logit + hidden KD, or layer by layer?

Compresses the built-in SmolLM2-135M as the offline recipe does (Kronecker, rank 4, the MLPs of
its 11 chosen blocks), then recovers it four ways from the same start, each on the same number of
Shakespeare training tokens, and prints perplexity on held-out Shakespeare (the test plays) side by
side with the base and the compressed-but-untrained model, as a table and as curves over tokens:

  (a) ce          next-token cross-entropy only (no teacher)
  (b) kd          logit KD: KL to the teacher's distribution at temperature T
      kd+ce       half logit KD, half CE (alpha 0.5, the DistilBERT-style mix)
  (c) kd+hidden   logit KD + cosine distance of every mapped hidden state
  (d) layerwise   groups of 4 blocks in turn (iterate): compress the group, fit each of its layers to
                  its teacher layer's outputs (local_distill, a fifth of the tokens), then logit KD

    python benchmarks/distill.py                         # the offline recipe's budget: 25,600 tokens
    python benchmarks/distill.py --tokens 2048 --blocks 12 --png /tmp/curves.png   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from llmshrink.context import Context
from llmshrink.distill.data import token_ids
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.plots import Panel, save_curves_png
from llmshrink.models import load_base_model
from llmshrink.passes import distill, iterate, kronecker
from llmshrink.specs import DataSpec

TARGETS = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
METHODS = ("ce", "kd", "kd+ce", "kd+hidden", "layerwise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="5,7,10,12,13,14,16,17,18,19,26", help="default: the offline recipe's choice")
    parser.add_argument("--tokens", type=int, default=25_600, help="training tokens per method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--local-lr", type=float, default=1e-2)
    parser.add_argument("--local-share", type=float, default=0.2, help="(d): share of its tokens for local fitting")
    parser.add_argument("--group-size", type=int, default=4, help="(d): blocks per group")
    parser.add_argument("--evals", type=int, default=5, help="points on each curve besides the start")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for the table")
    parser.add_argument("--curve-tokens", type=int, default=2048, help="held-out tokens for each curve point")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--png", default="docs/distill_curves.png")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--merge", default=None,
                        help="no training: print the table and draw the curves of these --json files (a,b,...)")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    methods = args.methods.split(",")
    per_step = args.batch_size * args.seq_len
    steps = max(1, args.tokens // per_step)
    if args.merge:  # runs of other methods with the same settings (each is deterministic) side by side
        results: dict = {}
        for path in args.merge.split(","):
            results |= json.loads(Path(path).read_text())
        report(results, [m for m in METHODS if m in results], steps * per_step, blocks, args.curve_tokens, args.png)
        return

    loaded = load_base_model("builtin:smollm2-135m")
    base, tokenizer = loaded.model, loaded.tokenizer
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    test = DataSpec(source="builtin:shakespeare", split="test", max_tokens=args.eval_tokens)
    table_ids = token_ids(test, tokenizer)
    curve_ids = table_ids[: args.curve_tokens]

    def ppl(model, ids=table_ids) -> float:
        return perplexity(model, ids, 512, 256, progress=False).ppl

    train = DataSpec(source="builtin:shakespeare", split="train", max_tokens=max(args.tokens, 4 * per_step))
    ctx = Context(tokenizer=tokenizer, teacher=teacher, data=train, seed=0, log=lambda line: None)
    ctx.evaluate = lambda model: ppl(model, curve_ids)
    kron = dict(targets=TARGETS, a_shape=(32, 24), rank=4, permute=False)
    every = max(1, steps // args.evals)
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=max(1, steps // 10),
                  eval_every=every)

    print(f"SmolLM2-135M, Kronecker rank 4 on the MLPs of blocks {blocks}; {steps} steps x {per_step} tokens "
          f"= {steps * per_step:,} training tokens per method; held-out perplexity on {table_ids.numel()} "
          "tokens of builtin:shakespeare (test), window 512, stride 256", flush=True)
    compressed = copy.deepcopy(base)
    kronecker.apply(compressed, kronecker.KroneckerConfig(layers=blocks, **kron), ctx)
    results = {"base": {"ppl": ppl(base)}, "compressed": {"ppl": ppl(compressed)}}
    start_ppl = ctx.evaluate(compressed)
    del base
    print(f"base {results['base']['ppl']:.2f}, compressed untrained {results['compressed']['ppl']:.2f}", flush=True)

    for method in methods:
        start = time.perf_counter()
        if method == "layerwise":
            model = copy.deepcopy(teacher).requires_grad_(True)
            local_steps, kd_steps, rest = _layerwise_split(steps, args.local_share, len(blocks), args.group_size)
            record = iterate.apply(model, iterate.IterateConfig(
                layers=blocks, group_size=args.group_size,
                stages=[{"kronecker": kron},
                        {"local_distill": dict(steps=local_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                               lr=args.local_lr, warmup_steps=0)},
                        {"distill": dict(steps=kd_steps, alpha=1.0, **common)}],
            ), ctx)
            points, trained = [(0, start_ppl)], 0
            for run in record["runs"]:  # tokens so far -> perplexity, through every group's stages
                for stage in run["stages"]:
                    curve = stage["record"].get("curve", {"eval": []})
                    points += [(trained + t, v) for t, v in curve["eval"][1:]]
                    trained += stage["record"].get("tokens", 0)
            if rest:  # the steps that did not divide among the groups, so that all methods see equal tokens
                kd = distill.apply(model, distill.DistillConfig(steps=rest, alpha=1.0, **common), ctx)
                points += [(trained + t, v) for t, v in kd["curve"]["eval"][1:]]
                trained += kd["tokens"]
        else:
            model = copy.deepcopy(compressed)
            cfg = {"ce": dict(alpha=0.0), "kd": dict(alpha=1.0), "kd+ce": dict(alpha=0.5),
                   "kd+hidden": dict(alpha=1.0, hidden_weight=1.0, hidden_loss="cosine")}[method]
            record = distill.apply(model, distill.DistillConfig(steps=steps, **cfg, **common), ctx)
            points, trained = [tuple(p) for p in record["curve"]["eval"]], record["tokens"]
        seconds = time.perf_counter() - start
        results[method] = {"ppl": ppl(model), "tokens": trained, "seconds": round(seconds, 1),
                           "tokens_per_s": round(trained / seconds, 1), "curve": points}
        print(f"{method}: perplexity {results[method]['ppl']:.2f} after {trained:,} tokens in {seconds:.0f}s",
              flush=True)
        del model

    report(results, methods, steps * per_step, blocks, curve_ids.numel(), args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, methods: list[str], tokens: int, blocks: list[int], curve_tokens: int, png: str) -> None:
    """The side-by-side table, the winner, and the curves PNG."""
    print("\n| method | training tokens | tokens/s (CPU, incl. evals) | held-out perplexity |")
    print("|---|---:|---:|---:|")
    print(f"| base (uncompressed) | - | - | {results['base']['ppl']:.2f} |")
    print(f"| compressed, untrained | 0 | - | {results['compressed']['ppl']:.2f} |")
    for method in methods:
        r = results[method]
        print(f"| {method} | {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['ppl']:.2f} |")
    winner = min(methods, key=lambda m: results[m]["ppl"])
    print(f"\nwinner at {tokens:,} tokens: {winner}")
    curves = {m: ([t for t, _ in results[m]["curve"]], [v for _, v in results[m]["curve"]]) for m in methods}
    save_curves_png(Path(png), [Panel(
        f"SmolLM2-135M, Kronecker MLPs of {len(blocks)} blocks: recovery at equal tokens",
        "training tokens", f"held-out perplexity ({curve_tokens} tokens)",
        {**curves, "base (uncompressed)": ([0, tokens], [results["base"]["ppl"]] * 2)}, log_y=True)])
    print(f"curves: {png}")


def _layerwise_split(steps: int, share: float, blocks: int, group_size: int) -> tuple[int, int, int]:
    """(local steps per group, KD steps per group, KD steps after the last group): `steps` in all."""
    groups = -(-blocks // group_size)
    if steps < 2 * groups:
        raise SystemExit(f"layerwise needs 2 steps per group, {2 * groups} in all; --tokens gives {steps}")
    local = max(1, round(steps * share / groups))
    kd = max(1, (steps - local * groups) // groups)
    return local, kd, max(0, steps - (local + kd) * groups)


if __name__ == "__main__":
    main()
