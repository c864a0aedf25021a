"""Command line: parse arguments, call the library.

Bad input -> one line on stderr, exit 2; any other failure -> one line, exit 1 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from llmshrink.errors import LlmshrinkError, first_line


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 unexpected failure, 2 bad input, 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        from llmshrink.quiet import hide_library_deprecations

        hide_library_deprecations()
    try:
        return args.run(args)
    except LlmshrinkError as err:
        if debug:
            traceback.print_exc()
        print(f"llmshrink: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmshrink: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an environment failure: one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"llmshrink: error: {args.command} failed: {first_line(err)}"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmshrink", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    # Also accepted after the subcommand; SUPPRESS keeps a subparser from resetting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", parents=[common], help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.set_defaults(run=_validate)

    apply = sub.add_parser("apply", parents=[common], help="compress -> distill -> evaluate -> save, as the recipe says")
    apply.add_argument("recipe")
    apply.add_argument("--output", help="checkpoint directory (default: the recipe's output.dir)")
    apply.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe field, e.g. --set stages.1.distill.steps=10")
    apply.set_defaults(run=_apply)

    plan = sub.add_parser("plan", parents=[common], help="plan a target: recipe and print it as an ordinary recipe "
                                                         "(measures, compresses nothing)")
    plan.add_argument("recipe")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    plan.add_argument("-o", "--output", help="also write the planned recipe to this YAML file")
    plan.set_defaults(run=_plan)

    sweep = sub.add_parser("sweep", parents=[common], help="apply a target: recipe at several budgets, then compare")
    sweep.add_argument("recipe")
    sweep.add_argument("--targets", required=True, help="comma-separated budgets of the recipe's target kind, "
                                                        "e.g. 0.9,0.8,0.7")
    sweep.add_argument("-o", "--output", help="directory of the checkpoints and the comparison (default: the "
                                              "recipe's output.dir)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    sweep.set_defaults(run=_sweep)

    evaluate = sub.add_parser("eval", parents=[common], help="run lm-eval tasks on a checkpoint, in memory")
    evaluate.add_argument("path", help="checkpoint directory (the output of apply)")
    evaluate.add_argument("--tasks", required=True,
                          help="comma-separated task names (see the package's evals, llmshrink/evals/README.md)")
    evaluate.add_argument("--include-path", help="directory of task YAMLs (default: the package's evals)")
    evaluate.add_argument("--limit", type=_limit, help="documents per task (below 1: a fraction)")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--num-fewshot", type=int)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--output", help="also write the results and protocol to this JSON file")
    evaluate.set_defaults(run=_eval)

    compare = sub.add_parser("compare", parents=[common], help="compare checkpoints: comparison.md/.json and a Pareto plot")
    compare.add_argument("paths", nargs="+", help="checkpoint directories written by apply")
    compare.add_argument("-o", "--output", default=".", help="directory for comparison.md/.json and pareto.png")
    compare.add_argument("--metric", default="perplexity",
                         help="y axis of the Pareto plot, e.g. perplexity (the dataset marked domain: out, if "
                              "any; for encoders, which have none: accuracy or spearman), "
                              "perplexity_by_dataset/NAME or lm_eval/TASK/acc")
    compare.add_argument("--no-base", action="store_true", help="leave the base model rows out")
    direction = compare.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher_better", action="store_const", const=True)
    direction.add_argument("--lower-is-better", dest="higher_better", action="store_const", const=False)
    compare.set_defaults(run=_compare)

    export = sub.add_parser("export", parents=[common], help="write a checkpoint for another runtime, verified in it: "
                                                             "a plain transformers model (hf-dense), a GGUF for "
                                                             "llama.cpp (gguf) or an ONNX graph with a KV cache (onnx)")
    export.add_argument("path", help="checkpoint directory (the output of apply)")
    export.add_argument("--format", required=True, help="hf-dense, gguf or onnx")
    export.add_argument("-o", "--output", required=True, help="the folder to write (must not exist)")
    export.add_argument("--quant", help="gguf: f32, f16 (default), q8_0, q4_0, q4_k, q5_k, q6_k (k-quants need rows "
                                        "that are multiples of 256); onnx: int8 (quantize_dynamic), int8-weights or "
                                        "int4-weights (MatMulNBits), default fp32")
    export.set_defaults(run=_export)

    push = sub.add_parser("push", parents=[common], help="upload a checkpoint directory to the Hugging Face hub")
    push.add_argument("path", help="checkpoint directory (the output of apply)")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its "
                                                             "visibility)")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes to upload; send nothing")
    push.add_argument("--message", dest="commit_message", help="commit message")
    push.set_defaults(run=_push)
    return parser


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (below 1: a fraction), got {text!r}") from None
    return int(value) if value.is_integer() and value >= 1 else value


def _validate(args) -> int:
    from llmshrink.recipe import load_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    names = ", ".join(stage.name for stage in loaded.stages) or "none"
    count = len(loaded.stages)
    target = loaded.recipe.target
    planned = f"target {target.kind} {target.value:g}: planned stages first, then " if target else ""
    print(f"{args.recipe}: ok ({planned}{count} stage{'' if count == 1 else 's'}: {names})")
    return 0


def _apply(args) -> int:
    from llmshrink.engine import run_recipe
    from llmshrink.recipe import load_recipe

    _quiet_libraries()
    loaded = load_recipe(args.recipe, args.overrides)
    run_recipe(loaded, output_dir=args.output)
    return 0


def _quiet_libraries() -> None:
    """Long commands: our own progress lines are the log; library chatter and datasets' bars (on stderr, where a
    failure must be the one line) stay out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already (the variable is read at import)
        sys.modules["datasets"].disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _plan(args) -> int:
    from llmshrink.plan_recipe import plan_recipe
    from llmshrink.recipe import load_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    if args.output and Path(args.output).exists():
        raise LlmshrinkError(f"--output: {args.output} exists; choose a new file (inputs are never overwritten)")
    _quiet_libraries()
    planned, text = plan_recipe(loaded)
    print()
    print(format_plan(planned.record))
    print()
    print(text, end="")
    if args.output:
        try:
            with open(args.output, "x", encoding="utf-8") as file:  # never over a file made during the planning
                file.write(text)
        except FileExistsError:
            raise LlmshrinkError(f"--output: {args.output} exists; choose a new file (inputs are never overwritten)") from None
        print(f"\nwrote {args.output}")
    return 0


def format_plan(record: dict) -> str:
    """The plan's decisions as a table: block, decision, saving, calibration KL / NLL increase (taken alone)."""
    unit = record["target"]["unit"]
    score = record["score"].upper()  # the measured loss: KL from the base or the text's NLL
    lines = [f"{'block':>5} | {'decision':<34} | {unit + ' saved':>14} | {score} increase", f"{'-' * 5}-+-{'-' * 34}-+-"
             f"{'-' * 14}-+--------------"]
    for row in record["decisions"]:
        block = "emb" if row["block"] < 0 else row["block"]
        lines.append(f"{block:>5} | {row['decision']:<34} | {row['saving']:>14,} | {row['loss_increase']:+.4f}")
    target, predicted = record["target"], record["predicted"]
    lines.append(f"{unit}: {target['base']:,} -> {predicted[unit]:,} ({predicted[unit] / target['base']:.3f}x; budget "
                 f"{target['limit']:,}), solver {record['solver']}")
    return "\n".join(lines)


def _sweep(args) -> int:
    from llmshrink.sweep import parse_targets, sweep

    targets = parse_targets(args.targets)
    _quiet_libraries()
    sweep(args.recipe, targets, args.output, args.overrides)
    return 0


def _eval(args) -> int:
    import json

    from llmshrink.checkpoint import MANIFEST_FILE
    from llmshrink.checkpoint_load import load_checkpoint, load_tokenizer
    from llmshrink.eval.lm_eval_bridge import run_lm_eval
    from llmshrink.fileio import atomic_write_text

    device = _eval_device(args.device)
    if args.output and not Path(args.output).resolve().parent.is_dir():  # found out before the evaluation, not after
        raise LlmshrinkError(f"--output: {Path(args.output).parent} is not a directory; create it first")
    path = Path(args.path)
    if not path.is_dir():
        raise LlmshrinkError(f"eval: {path}: no such checkpoint directory")
    for name in ("config.json", MANIFEST_FILE):
        if not (path / name).is_file():
            raise LlmshrinkError(f"eval: {path} is not an llmshrink checkpoint (no {name}); "
                                 "give a directory written by llmshrink apply")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise LlmshrinkError(f"eval: cannot load the tokenizer of {path}: {first_line(err)}") from err
    model = load_checkpoint(path, device=device)
    out = run_lm_eval(model, tokenizer, args.tasks, include_path=args.include_path, limit=args.limit,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    text = json.dumps(out, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0


def _eval_device(name: str):
    """--device as a torch device that exists here, or a one-line error (before any loading)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LlmshrinkError(f"--device: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmshrinkError(f"--device: {name!r} requested but no CUDA device is available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LlmshrinkError(f"--device: {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LlmshrinkError(f"--device: {name!r} requested but MPS is not available; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise LlmshrinkError(f"--device: {name!r} is not supported here; use cpu, cuda or cuda:N")
    return device


def _compare(args) -> int:
    from llmshrink.compare import compare

    compare(args.paths, args.output, metric=args.metric, include_base=not args.no_base,
            higher_better=args.higher_better)
    return 0


def _export(args) -> int:
    from llmshrink.export.spec import FORMATS

    if args.format not in FORMATS:
        raise LlmshrinkError(f"--format: {args.format!r} is not a format; allowed: {', '.join(FORMATS)}")
    if args.quant is not None and args.format == "hf-dense":
        raise LlmshrinkError("--quant: hf-dense keeps the checkpoint's dtype; quantize with --format gguf or onnx")
    from llmshrink.export.from_recipe import run_export

    _quiet_libraries()
    result = run_export(args.format, args.path, args.output, args.quant)
    print(f"exported {args.path} -> {args.output} ({args.format}): max |Δlogit| {result['max_abs_logit_diff']:.3g}, "
          f"top-1 agreement {result['top1_agreement']:.3f}")
    return 0


def _push(args) -> int:
    from llmshrink.push import push_checkpoint

    push_checkpoint(args.path, args.repo_id, private=args.private, dry_run=args.dry_run,
                    commit_message=args.commit_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
