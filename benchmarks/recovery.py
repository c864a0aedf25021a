"""Which recovery keeps a compressed model good on text it never saw: data × objective, with a control.

Two starting points from the built-in SmolLM2-135M, each recovered at equal tokens (the offline recipe's
budget: 50 steps of 4 x 128) with every pair of
  data       shakespeare (the corpus the recipes used), teacher (sampled from the base itself,
             data: {source: teacher}), mix (half of each)
  objective  fkl+ce (forward KL at T=2, half CE: the recipes' setting), rkl (MiniLLM's reverse KL),
             skew (DistiLLM's skew KL, mixing weight 0.1); rkl and skew are pure KD at T=1, as in their papers
and the control: the *uncompressed* base trained with the same data, steps and fkl+ce. What the control
gains or loses is the data's domain adaptation, not recovery from compression.

Columns: perplexity on held-out Shakespeare (in domain) and on the Python docs (out of domain, never
trained on), the offline lm-eval tasks' accuracy, training tokens and seconds. Each finished run is saved to
--json at once; a rerun skips the runs already there (the teacher samples are cached under --samples-dir).

    python benchmarks/recovery.py                                  # everything (hours on 2 cores)
    python benchmarks/recovery.py --starts kron --losses fkl+ce    # a part; rerun later for the rest
    python benchmarks/recovery.py --table                          # print the table of what --json holds
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llmshrink.context import Context
from llmshrink.distill.data import token_ids
from llmshrink.eval.lm_eval_bridge import run_lm_eval
from llmshrink.eval.perplexity import perplexity
from llmshrink.models import load_base_model
from llmshrink.passes import distill, kronecker, prune_ffn
from llmshrink.specs import DataSpec, MixDataSpec, TeacherDataSpec

MODEL = "builtin:smollm2-135m"
KRON_BLOCKS = [5, 7, 10, 12, 13, 14, 16, 17, 18, 19, 26]  # what the offline recipe's select_layers: 11 picks
STARTS = {
    "kron": "Kronecker rank 4, MLPs of 11 blocks (the offline recipe)",
    "prune_ffn": "prune_ffn keep 0.66, activation importance, global (about 0.8x params)",
    "prune_ffn+refit": "the same, output projections refitted by least squares (refit_output) on 8,192 tokens of the mix",
}
LOSSES = {
    "fkl+ce": dict(loss="forward_kl", alpha=0.5, temperature=2.0),
    "rkl": dict(loss="reverse_kl", alpha=1.0, temperature=1.0),
    "skew": dict(loss="skew_kl", alpha=1.0, temperature=1.0, skew=0.1),
}
DATA = ("shakespeare", "teacher", "mix")
CORPUS = DataSpec(source="builtin:shakespeare", split="train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", default="kron,prune_ffn,control", help="kron, prune_ffn and/or control")
    parser.add_argument("--data", default=",".join(DATA))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each perplexity text")
    parser.add_argument("--tasks", default="llmshrink_commonsense_mc,llmshrink_short_answers",
                        help="lm-eval tasks scored by accuracy ('' for none)")
    parser.add_argument("--json", default="benchmarks/results/recovery.json")
    parser.add_argument("--samples-dir", default="out/.recovery-samples", help="teacher samples cache")
    parser.add_argument("--table", action="store_true", help="no training: print the table of --json")
    args = parser.parse_args()
    path = Path(args.json)
    results: dict = json.loads(path.read_text()) if path.is_file() else {}
    if args.table:
        print_table(results)
        return
    tokens = args.steps * args.batch_size * args.seq_len
    plan = [(start, data, loss) for start in args.starts.split(",") for loss in args.losses.split(",")
            for data in args.data.split(",") if start != "control" or loss == "fkl+ce"]
    for start, data, loss in plan:
        if start not in (*STARTS, "control") or data not in DATA or loss not in LOSSES:
            raise SystemExit(f"unknown run {start}/{data}/{loss}; starts: {', '.join(STARTS)}, control; "
                             f"data: {', '.join(DATA)}; losses: {', '.join(LOSSES)}")

    loaded = load_base_model(MODEL)
    base, tokenizer = loaded.model, loaded.tokenizer
    teacher = base.requires_grad_(False).eval()
    texts = {"shakespeare": token_ids(DataSpec(source="builtin:shakespeare", split="test",
                                               max_tokens=args.eval_tokens), tokenizer),
             "python_docs": token_ids(DataSpec(source="builtin:python_docs", split="test",
                                               max_tokens=args.eval_tokens), tokenizer)}
    tasks = [t for t in args.tasks.split(",") if t]

    def measure(model) -> dict:
        row = {name: round(perplexity(model, ids, 512, 256, progress=False).ppl, 3) for name, ids in texts.items()}
        if tasks:
            scores = run_lm_eval(model, tokenizer, tasks, log=lambda _: None)["results"]
            row["tasks"] = {task: round(m["acc"], 4) if "acc" in m else _first_score(m) for task, m in scores.items()}
        return row

    def save(key: str, row: dict) -> None:
        results[key] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{key}: {_summary(row)}", flush=True)

    data_specs = {
        "shakespeare": CORPUS.model_copy(update={"max_tokens": tokens}),
        "teacher": TeacherDataSpec(source="teacher", tokens=tokens),
        "mix": MixDataSpec(source="mix", tokens=tokens, corpus=CORPUS),
    }
    contexts = {name: Context(tokenizer=tokenizer, teacher=teacher, data=spec, seed=0, log=lambda _: None,
                              samples_dir=Path(args.samples_dir), teacher_fingerprint=MODEL)
                for name, spec in data_specs.items()}
    print(f"{MODEL}: {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} training tokens per run; "
          f"perplexity on {args.eval_tokens} tokens (window 512, stride 256); lm-eval: {', '.join(tasks) or 'none'}",
          flush=True)
    if "base" not in results:
        save("base", measure(base) | {"params": _params(base)})
    starts: dict = {}
    for start, data, loss in plan:
        key = f"{start}/{data}/{loss}"
        if key in results:
            continue
        if start not in starts:
            # The refit reads the recipes' recovery text (the mix), whatever the run's data.
            ctx = contexts["mix"] if start.endswith("+refit") else contexts["shakespeare"]
            starts[start] = _compress(start, teacher, ctx)
            if start != "control" and f"{start}/untrained" not in results:
                save(f"{start}/untrained", measure(starts[start]) | {"params": _params(starts[start])})
        model = copy.deepcopy(starts[start]).requires_grad_(True)
        torch.manual_seed(0)
        began = time.perf_counter()
        record = distill.apply(model, distill.DistillConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
            warmup_steps=max(1, args.steps // 10), **LOSSES[loss]), contexts[data])
        seconds = time.perf_counter() - began  # teacher sampling included the first time it runs
        save(key, measure(model) | {"params": _params(model), "tokens": record["tokens"],
                                    "seconds": round(seconds, 1), "train_seconds": record["seconds"]})
        del model
    print_table(results)


def _compress(start: str, teacher, ctx: Context):
    model = copy.deepcopy(teacher)
    if start == "kron":
        kronecker.apply(model, kronecker.KroneckerConfig(
            targets=r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", a_shape=(32, 24), rank=4, permute=False,
            layers=KRON_BLOCKS), ctx)
    elif start.startswith("prune_ffn"):
        prune_ffn.apply(model, prune_ffn.PruneFfnConfig(
            importance="activation", keep=0.66, scope="global", min_keep=64, multiple_of=8,
            refit_output=start.endswith("+refit")), ctx)
    return model


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_score(metrics: dict) -> float:
    return round(next(v for k, v in metrics.items() if not k.endswith("_stderr")), 4)


def _summary(row: dict) -> str:
    tasks = ", ".join(f"{t} {v:.3f}" for t, v in row.get("tasks", {}).items())
    extra = f", {row['tokens']:,} tokens in {row['seconds']:.0f}s" if "tokens" in row else ""
    return f"shakespeare {row['shakespeare']:.2f}, python_docs {row['python_docs']:.2f}, {tasks}{extra}"


def _order(key: str) -> tuple:
    """base; then each start: untrained, then data x loss in the order of DATA and LOSSES; the control last."""
    start, *rest = key.split("/")
    starts = ["base", *STARTS, "control"]
    if not rest or rest == ["untrained"]:
        return starts.index(start), -1, -1
    data, loss = rest
    return starts.index(start), DATA.index(data), list(LOSSES).index(loss)


def print_table(results: dict) -> None:
    """The Markdown table: every run beside the base, ratios to the base's perplexities."""
    if "base" not in results:
        raise SystemExit("no results yet")
    base = results["base"]
    task_names = list(base.get("tasks", {}))
    head = ["run", "params", "in-domain ppl (Shakespeare)", "out-of-domain ppl (Python docs)",
            *[f"{t} acc" for t in task_names], "tokens", "seconds"]
    print("\n| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for key, row in sorted(results.items(), key=lambda item: _order(item[0])):
        ratio_in, ratio_out = row["shakespeare"] / base["shakespeare"], row["python_docs"] / base["python_docs"]
        cells = [key, f"{row['params'] / base['params']:.2f}x",
                 f"{row['shakespeare']:.2f} ({ratio_in:.2f}x)", f"{row['python_docs']:.2f} ({ratio_out:.2f}x)",
                 *[f"{row.get('tasks', {}).get(t, float('nan')):.3f}" for t in task_names],
                 f"{row['tokens']:,}" if "tokens" in row else "-", f"{row['seconds']:.0f}" if "seconds" in row else "-"]
        print("| " + " | ".join(cells) + " |")
    runs = {k: r for k, r in results.items() if k.count("/") == 2 and not k.startswith("control/")}
    if runs:
        best = min(runs, key=lambda k: runs[k]["python_docs"])
        print(f"\nbest out of domain: {best} ({runs[best]['python_docs'] / base['python_docs']:.2f}x the base)")


if __name__ == "__main__":
    main()
