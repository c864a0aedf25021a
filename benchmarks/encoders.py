"""BERT-family encoder compression side by side: all-MiniLM-L6-v2 on the built-in sentiment task (issue 17).

One run fine-tunes the built-in all-MiniLM-L6-v2 (BertModel, 22.7M params) on builtin:sentiment once (450
train / 150 test, binary): that model is the teacher and the base every row is measured against. Each row
starts from a copy of it (its state dict is kept in memory) and is measured in the same run:

    base       the fine-tuned teacher itself
    heads      prune_heads keep 0.5 (6 of 12 heads per layer, by weight magnitude) + task_distill
    ffn        prune_ffn keep 0.5 (768 of 1536 neurons per layer, by weight magnitude) + task_distill
    grid       the N x H grid: N FFN neurons and H attention heads kept per layer (prune_ffn, prune_heads with
               heads_per_layer), then a short task_distill (--grid-steps); (1536, 12) is the base
    kronecker  every FFN Linear (384x1536, 1536x384) as a rank-4 sum of 16x16 (x) B Kronecker products + task_distill
    int8       quantize int8-dynamic, embedding tables included (embeddings: true; the classifier stays fp32)
    fp16       quantize fp16 (the whole model cast; this CPU has no fast fp16 GEMM: its latency is what it is)
    tinybert   drop_layers [0, 2, 4] (3 of 6 blocks left) + task_distill with hidden states, twice the steps at 2e-4
    student    the tinybert row with the word embeddings factorised (low_rank embeddings: true, rank 128), 6x the steps

task_distill is TinyBERT's task distillation (prediction KL + hidden-state MSE) from the fine-tuned teacher on
the task's train split, batch 16, max_length 64, as recipes/minilm-*.yaml. Columns: unique params, size of the
state dict as one .safetensors file, test accuracy / F1 / MCC, accuracy kept (vs the base), latency of one
forward over a padded batch of the first 32 test texts (median of --latency-repeats after a warm-up), the
speed-up against the base timed in turn with each row (base, row, base, ...: both under the same machine
load), and the seconds the row's passes took (base: the fine-tuning).
Each row is saved to --json when it finishes; a rerun skips the rows already there (and does not fine-tune
when nothing is left to do). The issue's targets are checked below the tables.

    python benchmarks/encoders.py                                     # every row (about an hour on 2 cores)
    python benchmarks/encoders.py --rows base,int8,fp16               # a part; rerun later for the rest
    python benchmarks/encoders.py --rows grid --grid 1536,768 12,6    # a smaller N x H grid
    python benchmarks/encoders.py --table                             # print the tables of what --json holds
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from pathlib import Path

import torch

from llmshrink.context import Context
from llmshrink.eval.encoder_eval import EncoderTask
from llmshrink.eval.size import count_params, safetensors_bytes
from llmshrink.models import load_base_model
from llmshrink.passes import (
    drop_layers,
    finetune,
    kronecker,
    low_rank,
    prune_ffn,
    prune_heads,
    quantize,
    task_distill,
)
from llmshrink.specs import ModelSpec
from llmshrink.task_data import TaskSpec

MODEL = "builtin:minilm-l6"
TASK = TaskSpec(kind="classification", source="builtin:sentiment")
ROWS = ("base", "heads", "ffn", "grid", "kronecker", "int8", "fp16", "tinybert", "student")
FFN = r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"
KRON_A, KRON_RANK = (16, 16), 4  # divides 1536x384 and 384x1536: B is 96x24 or 24x96
STUDENT_RANK = 128  # the word table's rank in the student row: 11.7M -> 4.0M params
LATENCY_BATCH = 32
TARGET_STUDENT = {"params": 0.5, "accuracy": 0.97, "speedup": 1.8}
TARGET_INT8 = {"accuracy": 0.99, "size": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--finetune-steps", type=int, default=90, help="fine-tuning of the base (the teacher)")
    parser.add_argument("--distill-steps", type=int, default=90, help="task_distill steps (tinybert: twice)")
    parser.add_argument("--grid-steps", type=int, default=45, help="task_distill steps of each grid cell")
    parser.add_argument("--grid", nargs=2, default=["1536,1024,512", "12,8,4"], metavar=("N", "H"),
                        help="FFN neurons and heads kept per layer, each comma-separated")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed forwards (median)")
    parser.add_argument("--json", default="benchmarks/results/encoders.json")
    parser.add_argument("--table", action="store_true", help="no training: print the tables of --json")
    args = parser.parse_args()
    path = Path(args.json)
    saved: dict = json.loads(path.read_text()) if path.is_file() else {}
    if args.table:
        print_tables(saved.get("rows", {}))
        return
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := sorted(set(chosen) - set(ROWS)):
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    try:
        grid = [int(n) for n in args.grid[0].split(",")], [int(h) for h in args.grid[1].split(",")]
    except ValueError:
        parser.error(f"--grid: two comma-separated lists of integers, got {args.grid}")
    settings = {"finetune_steps": args.finetune_steps, "distill_steps": args.distill_steps,
                "grid_steps": args.grid_steps, "latency_batch": LATENCY_BATCH}
    if saved.get("settings", settings) != settings:
        raise SystemExit(f"{path} holds rows measured with {saved['settings']}, not {settings}: "
                         "pass another --json (or delete it) to start over")
    rows: dict = saved.get("rows", {})
    keys = ["base"] + [k for name in chosen if name != "base" for k in _keys(name, grid)]
    todo = [k for k in keys if k not in rows]
    if not todo:
        print(f"every row is in {path} already")
        print_tables(rows)
        return

    def save(key: str, row: dict) -> None:
        rows[key] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
        print(f"{key}: {row['params']:,} params, {row['bytes'] / 1e6:.1f} MB, accuracy {row['accuracy']:.3f}, "
              f"{row['batch_ms']:.1f} ms per batch ({row['base_batch_ms'] / row['batch_ms']:.2f}x), "
              f"{row['seconds']:.0f} s", flush=True)

    torch.manual_seed(0)
    loaded = load_base_model(ModelSpec(id=MODEL, task="sequence_classification", num_labels=2), log=lambda _: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    ctx = Context(tokenizer=tokenizer, task=TASK, seed=0, log=lambda _: None)
    task = EncoderTask(TASK, tokenizer, torch.device("cpu"))
    batch = task.batch(LATENCY_BATCH)  # the first 32 test texts, padded to the longest
    print(f"{MODEL} on {TASK.source}: fine-tuning {args.finetune_steps} steps; rows to measure: {', '.join(todo)}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    began = time.perf_counter()
    finetune.apply(model, finetune.FinetuneConfig(**_training(args.finetune_steps, 1e-4)), ctx)
    tuned_seconds = time.perf_counter() - began
    tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # every row starts from it
    # The base is measured in every run that measures anything: speed-ups and accuracy kept are against it.
    base = _measure(model, task, batch, args.latency_repeats, "the fine-tuned teacher", tuned_seconds)
    base["embedding_params"] = count_params(model.bert.embeddings)
    base["embedding_bytes"] = sum(p.numel() * p.element_size() for p in model.bert.embeddings.parameters())
    if "base" in todo:
        save("base", base | {"base_accuracy": base["accuracy"]})
    for key in todo:
        if key == "base":
            continue
        student = copy.deepcopy(model)
        student.load_state_dict(tuned_state)
        torch.manual_seed(0)
        began = time.perf_counter()
        settings_text = compress(key, student, ctx, args)
        seconds = time.perf_counter() - began
        row = _measure(student, task, batch, args.latency_repeats, settings_text, seconds, base=model)
        save(key, row | {"base_accuracy": base["accuracy"]})
        del student
    print_tables(rows)


def _keys(name: str, grid: tuple[list[int], list[int]]) -> list[str]:
    if name != "grid":
        return [name]
    return [f"grid/N{n}-H{h}" for n in grid[0] for h in grid[1] if (n, h) != (1536, 12)]  # (1536, 12): the base


def _training(steps: int, lr: float) -> dict:
    return {"steps": steps, "batch_size": 16, "lr": lr, "warmup_steps": max(1, steps // 10), "max_length": 64}


def compress(key: str, model, ctx: Context, args) -> str:
    """Apply the row's passes to `model` (a copy of the fine-tuned base); the settings the table shows."""

    def distill(steps: int, lr: float = 1e-4) -> None:
        task_distill.apply(model, task_distill.TaskDistillConfig(**_training(steps, lr)), ctx)

    if key == "heads":
        prune_heads.apply(model, prune_heads.PruneHeadsConfig(keep=0.5, importance="magnitude"), ctx)
        distill(args.distill_steps)
        return f"6 of 12 heads per layer (magnitude), task_distill {args.distill_steps} steps"
    if key == "ffn":
        prune_ffn.apply(model, prune_ffn.PruneFfnConfig(keep=0.5, importance="magnitude"), ctx)
        distill(args.distill_steps)
        return f"768 of 1536 FFN neurons per layer (magnitude), task_distill {args.distill_steps} steps"
    if key.startswith("grid/"):
        n, h = map(int, re.fullmatch(r"grid/N(\d+)-H(\d+)", key).groups())
        total = model.config.intermediate_size
        if not 1 <= n <= total:
            raise SystemExit(f"--grid: N={n} is not between 1 and {total}")
        if n < total:  # keep is a share of neurons: half a neuron above n makes the greedy pick exactly n
            record = prune_ffn.apply(model, prune_ffn.PruneFfnConfig(keep=(n + 0.5) / total, importance="magnitude"),
                                     ctx)
            assert {layer["kept"] for layer in record["layers"]} == {n}, record["layers"]
        if h < model.config.num_attention_heads:
            prune_heads.apply(model, prune_heads.PruneHeadsConfig(heads_per_layer=h, importance="magnitude"), ctx)
        distill(args.grid_steps)
        return f"N={n} neurons, H={h} heads per layer (magnitude), task_distill {args.grid_steps} steps"
    if key == "kronecker":
        kronecker.apply(model, kronecker.KroneckerConfig(targets=FFN, a_shape=KRON_A, rank=KRON_RANK, permute=False),
                        ctx)
        distill(args.distill_steps)
        return (f"FFN Linears: A {KRON_A[0]}x{KRON_A[1]}, rank {KRON_RANK}, no permutation; "
                f"task_distill {args.distill_steps} steps")
    if key in ("int8", "fp16"):
        method = "int8-dynamic" if key == "int8" else "fp16"
        settings = {"method": method, **({"embeddings": True} if key == "int8" else {})}
        quantize.apply(model, quantize.QuantizeConfig(**settings), ctx)
        return ("int8 weights (per channel) and activations (per token) in the blocks' Linears, int8 embedding "
                "tables (a scale per row)" if key == "int8" else "every parameter in fp16")
    if key == "tinybert":
        drop_layers.apply(model, drop_layers.DropLayersConfig(layers=[0, 2, 4]), ctx)
        distill(2 * args.distill_steps, lr=2e-4)
        return f"blocks 1, 3, 5 kept; task_distill (prediction + hidden states) {2 * args.distill_steps} steps"
    if key == "student":  # minilm-student: the tinybert row with the word embeddings factorised (ALBERT-style)
        drop_layers.apply(model, drop_layers.DropLayersConfig(layers=[0, 2, 4]), ctx)
        low_rank.apply(model, low_rank.LowRankConfig(targets=None, embeddings=True, rank=STUDENT_RANK), ctx)
        distill(6 * args.distill_steps, lr=2e-4)
        return (f"blocks 1, 3, 5 kept, word embeddings rank {STUDENT_RANK}; task_distill {6 * args.distill_steps} "
                "steps")
    raise ValueError(key)


def _measure(model, task: EncoderTask, batch: dict, repeats: int, settings: str, seconds: float,
             base=None) -> dict:
    """Scores, size, and the median ms of `repeats` forwards over `batch` after one warm-up; with `base`, the
    base is timed in turn with the model (base, model, base, ...), so that both see the same machine load."""
    scores = task.scores(model)
    models = [model] if base is None else [base, model]
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m.eval()(**batch)  # warm-up
        for _ in range(repeats):
            for m, spent in zip(models, times, strict=True):
                began = time.perf_counter()
                m(**batch)
                spent.append((time.perf_counter() - began) * 1000)
    ms = [round(statistics.median(spent), 2) for spent in times]
    return {"settings": settings, "params": count_params(model), "bytes": safetensors_bytes(model),
            "accuracy": scores["accuracy"], "f1": scores["f1"], "mcc": scores["matthews_corrcoef"],
            "batch_ms": ms[-1], "base_batch_ms": ms[0], "seconds": round(seconds, 1)}


def _order(key: str) -> tuple:
    name, _, cell = key.partition("/")
    sizes = [-int(x) for x in re.findall(r"\d+", cell)]
    return ROWS.index(name), sizes


def print_tables(rows: dict) -> None:
    """The Markdown tables: every row beside the base (ratios: to the base measured in the row's run), then the
    grid's accuracy and latency by N and H, then which rows meet the issue's targets."""
    if "base" not in rows:
        raise SystemExit("no results yet")
    base = rows["base"]
    print("\n| row | settings | params | params ratio | size MB | size ratio | accuracy | F1 | MCC | accuracy kept | "
          f"latency ms (batch {LATENCY_BATCH}) | speed-up | compress s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in sorted(rows.items(), key=lambda item: _order(item[0])):
        print(f"| {key} | {r['settings']} | {r['params']:,} | {r['params'] / base['params']:.2f}x | "
              f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / base['bytes']:.2f}x | {r['accuracy']:.3f} | {r['f1']:.3f} | "
              f"{r['mcc']:.3f} | {_kept(r):.2f}x | {r['batch_ms']:.1f} | {_speedup(r):.2f}x | {r['seconds']:.0f} |")
    print("\nspeed-up: the base's ms over the row's, the base timed in turn with that row (base_batch_ms in the "
          "JSON), not the base row's ms above; compress s of the base: its fine-tuning")
    cells = {tuple(map(int, re.findall(r"\d+", k))): r for k, r in rows.items() if k.startswith("grid/")}
    if cells:
        cells[1536, 12] = base
        ns = sorted({n for n, _ in cells}, reverse=True)
        hs = sorted({h for _, h in cells}, reverse=True)
        print("\naccuracy (latency ms per batch, speed-up) by N = FFN neurons (rows) and H = heads (columns) kept "
              "per layer\n")
        print("| N \\ H | " + " | ".join(str(h) for h in hs) + " |")
        print("|---|" + "---:|" * len(hs))
        for n in ns:
            row = [f"{cells[n, h]['accuracy']:.3f} ({cells[n, h]['batch_ms']:.0f} ms, {_speedup(cells[n, h]):.2f}x)"
                   if (n, h) in cells else "-" for h in hs]
            print(f"| {n} | " + " | ".join(row) + " |")
    print_targets(rows)


def _kept(r: dict) -> float:
    return r["accuracy"] / r["base_accuracy"]


def _speedup(r: dict) -> float:
    return r["base_batch_ms"] / r["batch_ms"]


def print_targets(rows: dict) -> None:
    base = rows["base"]
    t = TARGET_STUDENT
    print(f"\ntargets (issue 17):\n- a student at <= {t['params']}x the teacher's params keeping >= "
          f"{t['accuracy']:.0%} of its accuracy and >= {t['speedup']}x faster per batch:")
    students = {k: r for k, r in rows.items() if k not in ("base", "int8", "fp16")}
    for key, r in sorted(students.items(), key=lambda item: _order(item[0])):
        misses = [what for what, ok in (
            (f"params {r['params'] / base['params']:.2f}x", r["params"] / base["params"] <= t["params"]),
            (f"accuracy kept {_kept(r):.1%}", _kept(r) >= t["accuracy"]),
            (f"speed-up {_speedup(r):.2f}x", _speedup(r) >= t["speedup"])) if not ok]
        print(f"  {key}: " + ("MET" if not misses else "not met: " + ", ".join(misses)))
    if not students:
        print("  no student row measured")
    small = any(r["params"] / base["params"] <= t["params"] for r in students.values())
    if "embedding_params" in base and not small:
        share = base["embedding_params"] / base["params"]
        print(f"  every row keeps the embeddings ({base['embedding_params']:,} params, {share:.2f}x of the teacher; "
              "the 30,522-word table alone 11.7M): without the student row (low_rank embeddings), no row can reach "
              f"{t['params']}x params" + (" (they alone exceed it)" if share > t["params"] else ""))
    t = TARGET_INT8
    if "int8" in rows:
        r = rows["int8"]
        size, kept = r["bytes"] / base["bytes"], _kept(r)
        ok = size <= t["size"] and kept >= t["accuracy"]
        print(f"- int8-dynamic at >= {t['accuracy']:.0%} accuracy and <= {t['size']}x size: "
              f"{'MET' if ok else 'not met'} (accuracy kept {kept:.1%}, size {size:.2f}x)")
        if size > t["size"] and "embedding_bytes" in base:
            floor = base["embedding_bytes"] / base["bytes"]
            print(f"  int8-dynamic quantizes the blocks' Linears only: the fp32 embeddings alone are "
                  f"{base['embedding_bytes'] / 1e6:.1f} MB, {floor:.2f}x of the teacher's bytes, so its size "
                  f"cannot go below {floor:.2f}x (int8 embeddings would be needed for {t['size']}x)")


if __name__ == "__main__":
    main()
