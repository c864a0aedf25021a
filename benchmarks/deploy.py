"""Where small models run: the base and compressed SmolLM2-135M in PyTorch fp32 and exported to llama.cpp (GGUF)
and ONNX Runtime, each measured in its own runtime against PyTorch fp32 of the base in the same run.

Models: the base (builtin:smollm2-135m) and three compressed checkpoints, by default those benchmarks/target.py
keeps at 0.8x params (`python benchmarks/target.py --budgets params:0.8 --rows planned,drop_layers,prune_ffn --keep`):
drop_layers, prune_ffn and planned (the planner's combination of dropped blocks, pruned FFN neurons and heads),
each recovered alike. Formats: PyTorch fp32 (the checkpoint), GGUF f16 / q8_0 / q4_0 (llmshrink export, checked
in llama.cpp: the f32 file, then quantized by llama.cpp as the export does), ONNX fp32 / int8 (checked in
onnxruntime).

Columns: size on disk (the weights file(s)), prefill ms of a 128-token prompt and greedy decode tokens/s of 128
new tokens (batch 1, 2 threads, KV cache, median of 5 after a warm-up: eval.latency.greedy_speed, one protocol
for every runtime; llama.cpp with its default f16 KV cache as deployed), perplexity in the runtime on held-out
Shakespeare (in domain: the recovery trained on Shakespeare) and on the Python docs (out of domain), by the
windows of llmshrink.eval.perplexity (512, stride 256). Ratios are against PyTorch fp32 of the base, and
"vs base alike" against the base in the same format.

Exports are kept under --work (a rerun reuses them) and each measured row goes to --json at once (a rerun skips
it): `--exports-only` makes the files first, so that the timed rows can run later on an otherwise idle machine.

    python benchmarks/deploy.py                     # about 40 min on 2 cores
    python benchmarks/deploy.py --models base,planned=out/target-bench/params-0.8-planned --formats pytorch,gguf-q4_0
    python benchmarks/deploy.py --table             # the table of what --json holds
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.distill.data import token_ids
from llmshrink.eval.latency import torch_greedy_speed
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.size import dir_size
from llmshrink.export.from_recipe import run_export
from llmshrink.export.staging import THREADS
from llmshrink.models import load_base_model
from llmshrink.specs import DataSpec

BASE = "builtin:smollm2-135m"
MODELS = ("base", "drop_layers=out/target-bench/params-0.8-drop_layers",
          "prune_ffn=out/target-bench/params-0.8-prune_ffn", "planned=out/target-bench/params-0.8-planned")
# name: (export format, quantization; None: the checkpoint itself in PyTorch)
FORMATS = {"pytorch": None, "gguf-f16": ("gguf", "f16"), "gguf-q8_0": ("gguf", "q8_0"), "gguf-q4_0": ("gguf", "q4_0"),
           "onnx-fp32": ("onnx", None), "onnx-int8": ("onnx", "int8")}
TEXTS = {"shakespeare": "builtin:shakespeare", "python_docs": "builtin:python_docs"}
# The target figure for a compressed model's 4-bit GGUF.
TARGET = {"size": 0.25, "decode_speedup": 6.0, "ood_ppl": 1.3, "decode_vs_base_alike": 1.25}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="base, and name=checkpoint, comma-separated")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    parser.add_argument("--json", default="benchmarks/results/deploy.json")
    parser.add_argument("--work", default="out/deploy-bench", help="the base's checkpoint and every export")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each perplexity text")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exports-only", action="store_true", help="make the exports, measure nothing")
    parser.add_argument("--table", action="store_true", help="no runs: print the table of --json")
    parser.add_argument("--plot", default="docs/deploy.png", help="decode tokens/s against out-of-domain perplexity")
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {','.join(FORMATS)}")
    path = Path(args.json)
    results: dict = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table:
        torch.set_num_threads(THREADS)
        run(args, dict(_model(spec) for spec in args.models.split(",")), formats, results, path)
    print_table(results)
    if args.plot:
        save_plot(results, Path(args.plot))


def _model(spec: str) -> tuple[str, str]:
    name, _, checkpoint = spec.partition("=")
    return name, checkpoint or BASE


def run(args: argparse.Namespace, models: dict[str, str], formats: list[str], results: dict, path: Path) -> None:
    work = Path(args.work)
    loaded = load_base_model(BASE)
    tokenizer = loaded.tokenizer
    texts = {name: token_ids(DataSpec(source=source, split="test", max_tokens=args.eval_tokens), tokenizer)
             for name, source in TEXTS.items()}
    prompt = texts["python_docs"][: args.prompt_tokens].tolist()
    base_checkpoint = work / "base-checkpoint"
    if not base_checkpoint.is_dir():  # llmshrink export reads checkpoints: the base saved as one, once
        save_checkpoint(loaded.model, tokenizer, base_checkpoint, recipe_text=f"name: base\nmodel: {{id: {BASE}}}\n",
                        manifest={"name": "base"}, model_card="# SmolLM2-135M, as shipped\n")
    del loaded
    for name, checkpoint in models.items():
        checkpoint_path = base_checkpoint if checkpoint == BASE else Path(checkpoint)
        if not checkpoint_path.is_dir():
            raise SystemExit(f"--models: {name}={checkpoint} is not a checkpoint folder (benchmarks/target.py "
                             "--keep makes the default ones)")
        for fmt in formats:
            key = f"{name}/{fmt}"
            if key in results or (args.exports_only and FORMATS[fmt] is None):
                continue
            exported = export(checkpoint_path, work / "exports" / name / fmt, FORMATS[fmt]) if FORMATS[fmt] else None
            if args.exports_only:
                continue
            print(f"\n=== {key}", flush=True)
            results[key] = measure(checkpoint_path, fmt, exported, texts, prompt, args)
            print(json.dumps(results[key]), flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1) + "\n")


def export(checkpoint: Path, out: Path, setting: tuple[str, str | None]) -> dict:
    """The export's record (export.json): made once, then reused (an export folder exists only complete). A GGUF
    quantization is llama.cpp's quantizer run on the model's checked f32 export, as `llmshrink export --quant`
    does it, so that the f32 file is written and checked once per model rather than once per quantization."""
    fmt, quant = setting
    if fmt == "gguf" and quant != "f32" and not out.is_dir():
        return gguf_from_f32(export(checkpoint, out.parent / "gguf-f32", ("gguf", "f32")), out, quant)
    if not out.is_dir():
        began = time.perf_counter()
        run_export(fmt, checkpoint, out, quant, log=lambda line: print(line, flush=True))
        print(f"  exported in {time.perf_counter() - began:.0f} s", flush=True)
    return json.loads((out / "export.json").read_text())


def gguf_from_f32(f32: dict, out: Path, quant: str) -> dict:
    from llmshrink.export.gguf import QUANTS
    from llmshrink.export.gguf_runtime import quantize

    partial = out.with_name(f"{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    quantize(Path(f32["path"]), partial / f"model-{quant}.gguf", QUANTS[quant])
    record = {"format": "gguf", "quant": quant, "path": str(out / f"model-{quant}.gguf"), "source": f32["source"],
              "quantized_from": f32["path"], "params": f32["params"],
              "bytes": (partial / f"model-{quant}.gguf").stat().st_size}
    (partial / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(out)
    print(f"  {out}: {quant} from {f32['path']}", flush=True)
    return record


def measure(checkpoint: Path, fmt: str, exported: dict | None, texts: dict, prompt: list[int],
            args: argparse.Namespace) -> dict:
    """Size, speed and perplexity of one model in one runtime."""
    window = {"window": 512, "stride": 256}
    if exported is None:
        model = load_checkpoint(checkpoint)
        size = dir_size(checkpoint, weights_only=True)
        speed = torch_greedy_speed(model, prompt, args.new_tokens, args.repeats)
        ppl = {name: perplexity(model, ids, progress=False, **window).ppl for name, ids in texts.items()}
        params = sum(p.numel() for p in model.parameters())
    elif fmt.startswith("gguf"):
        from llmshrink.export.gguf_runtime import gguf_decode_speed, gguf_perplexity

        file = Path(exported["path"])
        size, params = file.stat().st_size, exported["params"]
        speed = gguf_decode_speed(file, prompt, args.new_tokens, args.repeats)
        ppl = {name: gguf_perplexity(file, ids, **window).ppl for name, ids in texts.items()}
    else:
        from llmshrink.export.onnx_run import OnnxModel, decode_speed, onnx_perplexity

        runtime = OnnxModel(exported["path"])
        size, params = exported["bytes"], None
        speed = decode_speed(runtime, prompt, args.new_tokens, args.repeats)
        ppl = {name: onnx_perplexity(runtime, ids, **window).ppl for name, ids in texts.items()}
    return {"bytes": size, "params": params, "prefill_ms": round(speed["prefill_ms"], 2),
            "decode_tokens_per_s": round(speed["decode_tokens_per_s"], 2), "greedy_tokens": speed["tokens"],
            **{name: round(value, 3) for name, value in ppl.items()}}


def print_table(results: dict) -> None:
    base = results.get("base/pytorch")
    if base is None:
        raise SystemExit("no result for base/pytorch yet: every ratio is against it")
    print("\n| model | format | size MB | size vs base fp32 | prefill ms | decode tok/s | decode vs base fp32 | "
          "decode vs base alike | in-domain ppl (Shakespeare) | out-of-domain ppl (Python docs) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, row in results.items():
        name, fmt = key.split("/")
        alike = results.get(f"base/{fmt}")
        cells = [name, fmt, f"{row['bytes'] / 1e6:.1f}", f"{row['bytes'] / base['bytes']:.3f}x",
                 f"{row['prefill_ms']:.1f}", f"{row['decode_tokens_per_s']:.1f}",
                 f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
                 f"{row['decode_tokens_per_s'] / alike['decode_tokens_per_s']:.2f}x" if alike else "-",
                 f"{row['shakespeare']:.2f} ({row['shakespeare'] / base['shakespeare']:.2f}x)",
                 f"{row['python_docs']:.2f} ({row['python_docs'] / base['python_docs']:.2f}x)"]
        print("| " + " | ".join(cells) + " |")
    print_target(results, base)


def print_target(results: dict, base: dict) -> None:
    """The target figure, checked on each compressed model's q4_0 GGUF."""
    alike = results.get("base/gguf-q4_0")
    for key, row in results.items():
        name, fmt = key.split("/")
        if fmt != "gguf-q4_0" or name == "base":
            continue
        checks = {"size": (row["bytes"] / base["bytes"], "<="),
                  "decode_speedup": (row["decode_tokens_per_s"] / base["decode_tokens_per_s"], ">="),
                  "ood_ppl": (row["python_docs"] / base["python_docs"], "<="),
                  "decode_vs_base_alike": (row["decode_tokens_per_s"] / alike["decode_tokens_per_s"], ">=")
                  if alike else (float("nan"), ">=")}
        parts = [f"{what} {got:.2f}x {op} {TARGET[what]}x: "
                 + ("met" if (got <= TARGET[what] if op == "<=" else got >= TARGET[what]) else "NOT met")
                 for what, (got, op) in checks.items()]
        print(f"target, {name} q4_0: " + "; ".join(parts))


def save_plot(results: dict, path: Path) -> None:
    """Decode tokens/s against out-of-domain perplexity: one colour per model, one marker per format."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    from llmshrink.fileio import atomic_save_png

    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    models = list(dict.fromkeys(key.split("/")[0] for key in results))
    markers = dict(zip(FORMATS, "osD^vP", strict=True))
    for key, row in results.items():
        name, fmt = key.split("/")
        ax.scatter(row["decode_tokens_per_s"], row["python_docs"], color=f"C{models.index(name)}", marker=markers[fmt],
                   s=50)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel=f"greedy decode tokens/s ({THREADS} threads, batch 1)",
           ylabel="perplexity on Python docs (out of domain)")
    ax.set_title("SmolLM2-135M and compressed models in PyTorch, llama.cpp and ONNX Runtime", fontsize=10)
    ax.grid(True, alpha=0.3)
    # Two legends: the colour names the model, the marker the format.
    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="", label=name) for i, name in enumerate(models)]
    handles += [Line2D([], [], color="grey", marker=markers[fmt], linestyle="", label=fmt) for fmt in FORMATS]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_png(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
