"""Ask for a size: the `target:` planner against every single-pass recipe at the same budget.

For each budget (params 0.9 / 0.8 / 0.7 of the built-in SmolLM2-135M, and bytes 0.3), one recipe per row, all
run by `llmshrink apply`'s engine and recovered alike (the shipped recipes' distill stage: 50 steps x 4 x 128
tokens on half Shakespeare, half teacher samples):

  planned       target: {params: B} with the default search (drop a block; prune_ffn keep 0.75/0.5/0.25;
                prune_heads keep 0.67/0.34; bytes: int8-dynamic or bnb-nf4 per block), each decision scored
                by its KL from the base on 1024 calibration tokens
  planned_nll   the same, scored by the calibration text's NLL (the planner's score before KL)
  drop_layers   the fewest blocks (of least influence) whose removal meets B
  prune_ffn     activation importance, global scope, the neuron share that meets B
  low_rank      activation-aware SVD of every block layer at the ratio that meets B
  kronecker     as shipped (offline recipe: rank 4, 32x24 factors, ~1% of the MLP kept) on the least
                sensitive blocks, as many as B needs
  kronecker_tq  TQCompressedGPT-2's setting: every other block's MLP at about half of each matrix's
                parameters, with the permutation search (one size, ~0.85x: compared at 0.9)
  nf4 (bytes)   bnb-nf4 on every block layer (embeddings stay fp32)

Columns: params (or bytes), perplexity on held-out Shakespeare (in domain) and on the Python docs (out of
domain, never trained on), compression and total seconds. Each finished row goes to --json at once; a rerun
skips the rows there. The planner's measurements are cached (LLMSHRINK_CACHE/plans), so the budgets after
the first only solve.

    python benchmarks/target.py                       # everything (hours on 2 cores)
    python benchmarks/target.py --budgets params:0.7  # one budget
    python benchmarks/target.py --table               # the table of what --json holds
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import yaml

from llmshrink.engine import run_recipe
from llmshrink.recipe import load_recipe

MODEL = "builtin:smollm2-135m"
BUDGETS = ("params:0.9", "params:0.8", "params:0.7", "bytes:0.3")
ROWS = ("planned", "planned_nll", "drop_layers", "prune_ffn", "low_rank", "kronecker", "kronecker_tq", "nf4")
# SmolLM2-135M: 30 blocks of 576 wide, SwiGLU FFN of 1536, 9 query / 3 kv heads of 64.
BLOCKS, HIDDEN, FFN = 30, 576, 1536
MLP_PARAMS = 3 * HIDDEN * FFN
ATTENTION_PARAMS = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * 192
BASE_PARAMS = 134_515_008


def settings(steps: int, eval_tokens: int) -> tuple[dict, dict, dict]:
    """(the distill stage, the data: section, the evaluate: section) of every row: `steps` x 4 x 128 tokens."""
    distill = {"distill": {"steps": steps, "batch_size": 4, "seq_len": 128, "lr": 3.0e-4,
                           "warmup_steps": min(5, steps - 1), "alpha": 0.5, "temperature": 2.0}}
    data = {"source": "mix", "tokens": steps * 4 * 128, "teacher_share": 0.5,
            "corpus": {"source": "builtin:shakespeare", "split": "train"}}
    evaluate = {"perplexity": [
        {"name": "shakespeare", "data": {"source": "builtin:shakespeare", "split": "test", "max_tokens": eval_tokens},
         "window": 512, "stride": 256},
        {"name": "python_docs", "domain": "out", "data": {"source": "builtin:python_docs", "split": "test",
                                                          "max_tokens": eval_tokens}, "window": 512, "stride": 256},
    ], "latency": None, "memory": False, "after_each_stage": False}
    return distill, data, evaluate


def compression(row: str, kind: str, value: float, search: dict) -> dict | list | None:
    """The row's compression at this budget: {"target": ..., "search": ...} or a list of stages; None when the
    row has no setting at this budget."""
    need = BASE_PARAMS - int(value * BASE_PARAMS)
    tokens = search["calibration_tokens"]
    if row in ("planned", "planned_nll"):
        if kind == "bytes":
            search = {"quantize": ["int8-dynamic", "bnb-nf4"], **search}
        return {"target": {kind: value}, "search": {"score": "nll" if row == "planned_nll" else "kl", **search}}
    if kind == "bytes":
        return [{"quantize": {"method": "bnb-nf4"}}] if row == "nf4" else None
    block = MLP_PARAMS + ATTENTION_PARAMS + 2 * HIDDEN
    if row == "drop_layers":
        return [{"drop_layers": {"keep": BLOCKS - math.ceil(need / block), "calibration_tokens": tokens}}]
    if row == "prune_ffn":  # a margin for the per-block rounding to multiples of 8
        keep = 1 - need / (BLOCKS * MLP_PARAMS) - 0.004
        return [{"prune_ffn": {"keep": round(keep, 4), "scope": "global", "min_keep": 64, "multiple_of": 8,
                               "calibration_tokens": tokens}}]
    if row == "low_rank":
        ratio = 1 - need / (BLOCKS * (MLP_PARAMS + ATTENTION_PARAMS)) - 0.003
        return [{"low_rank": {"ratio": round(ratio, 4), "activation_aware": True, "calibration_tokens": tokens}}]
    if row == "kronecker":
        return [{"kronecker": {"targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", "a_shape": [32, 24],
                               "rank": 4, "select_layers": math.ceil(need / (0.99 * MLP_PARAMS)),
                               "calibration_tokens": 512, "permute": False}}]
    if row == "kronecker_tq" and value >= 0.86:
        return [{"kronecker": {"targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", "ratio": 0.5,
                               "max_rank": 1024, "layers": list(range(0, BLOCKS, 2)), "permute": True}}]
    return None


def recipe(row: str, kind: str, value: float, out: Path, args: argparse.Namespace) -> dict | None:
    setting = compression(row, kind, value, {"calibration_tokens": args.calibration_tokens, **json.loads(args.search)})
    if setting is None:
        return None
    distill, data, evaluate = settings(args.steps, args.eval_tokens)
    stages = [*(setting if isinstance(setting, list) else []), distill]
    return {"name": f"target-{kind}-{value:g}-{row}", "seed": 0, "model": {"id": MODEL}, "data": data,
            **(setting if isinstance(setting, dict) else {}), "stages": stages, "evaluate": evaluate,
            "output": {"dir": str(out)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="kind:value, comma-separated")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", default="benchmarks/results/target.json")
    parser.add_argument("--work", default="out/target-bench", help="recipes and (with --keep) checkpoints")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (about 0.5 GB each)")
    parser.add_argument("--table", action="store_true", help="no runs: print the table of --json")
    parser.add_argument("--plot", default="docs/target.png", help="params vs out-of-domain perplexity of each row")
    parser.add_argument("--steps", type=int, default=50, help="distillation steps of every row (x 4 x 128 tokens)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each perplexity text")
    parser.add_argument("--calibration-tokens", type=int, default=1024, help="of the planner and the passes")
    parser.add_argument("--search", default="{}", help="JSON settings over the planned row's search: section")
    args = parser.parse_args()
    path = Path(args.json)
    results: dict = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table:
        for budget in args.budgets.split(","):
            kind, value = budget.split(":")
            for row in args.rows.split(","):
                key = f"{kind}:{float(value):g}/{row}"
                if key not in results:
                    run_row(key, row, kind, float(value), args, results, path)
    print_table(results)
    if args.plot:
        save_plot(results, Path(args.plot))


def run_row(key: str, row: str, kind: str, value: float, args: argparse.Namespace, results: dict, path: Path) -> None:
    work = Path(args.work)
    out = work / key.replace(":", "-").replace("/", "-")
    raw = recipe(row, kind, value, out, args)
    if raw is None:
        return
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"{out.name}.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n=== {key}", flush=True)
    began = time.perf_counter()
    manifest = run_recipe(load_recipe(recipe_path), log=lambda line: print(line, flush=True),
                          samples_dir=work / "teacher-samples")  # sampled once for every row
    metrics = manifest["metrics"]
    results.setdefault("base", _row(metrics["base"]))
    results[key] = _row(metrics["compressed"]) | {"seconds": round(time.perf_counter() - began),
                                                   "compress_seconds": round(metrics["compressed"]["compress_seconds"])}
    if "plan" in manifest:
        plan = manifest["plan"]
        results[key]["plan"] = {"decisions": [f"{d['block']}: {d['decision']}" for d in plan["decisions"]],
                                "estimated_loss": plan["predicted"]["loss"], "joint_loss": plan["measured"]["loss"],
                                "base_loss": plan["base"]["loss"], "solver": plan["solver"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def _row(metrics: dict) -> dict:
    ppl = metrics["perplexity_by_dataset"]
    return {"params": metrics["params"], "bytes": metrics["size_bytes"], "shakespeare": round(ppl["shakespeare"], 3),
            "python_docs": round(ppl["python_docs"], 3)}


def print_table(results: dict) -> None:
    if "base" not in results:
        raise SystemExit("no results yet")
    base = results["base"]
    print("\n| budget | recipe | params | bytes | within budget | in-domain ppl (Shakespeare) | out-of-domain ppl "
          "(Python docs) | seconds |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for key, row in results.items():
        if key == "base":
            continue
        budget, name = key.split("/")
        kind, value = budget.split(":")
        within = "yes" if row[kind] <= int(float(value) * base[kind]) else "**over**"
        cells = [budget, name, f"{row['params'] / base['params']:.3f}x", f"{row['bytes'] / base['bytes']:.3f}x", within,
                 f"{row['shakespeare']:.2f} ({row['shakespeare'] / base['shakespeare']:.2f}x)",
                 f"{row['python_docs']:.2f} ({row['python_docs'] / base['python_docs']:.2f}x)", f"{row['seconds']}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nbase: {base['params']:,} params, {base['bytes']:,} bytes, Shakespeare {base['shakespeare']:.2f}, "
          f"Python docs {base['python_docs']:.2f}")


def save_plot(results: dict, path: Path) -> None:
    """Parameters (share of the base) against out-of-domain perplexity: one line per recipe across the budgets."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from llmshrink.fileio import atomic_save_png

    base = results["base"]
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row in ROWS:
        points = sorted((r["params"] / base["params"], r["python_docs"]) for key, r in results.items()
                        if key.startswith("params:") and key.endswith(f"/{row}"))
        if points:
            style = {"linewidth": 2.5, "color": "black", "zorder": 3} if row == "planned" else {"linewidth": 1}
            ax.plot(*zip(*points, strict=True), marker="o", label=row, **style)
    ax.axhline(base["python_docs"], color="grey", linestyle=":", label="base")
    ax.set_yscale("log")
    ax.set(xlabel="parameters (share of the base)", ylabel="perplexity on Python docs (out of domain)")
    ax.set_title("SmolLM2-135M: planned vs single-pass at equal params, recovered alike", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_png(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
