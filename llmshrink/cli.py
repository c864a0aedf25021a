"""Command line: parse arguments, call the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from llmshrink.errors import LlmshrinkError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except LlmshrinkError as err:
        print(f"llmshrink: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmshrink: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmshrink", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.set_defaults(run=_validate)

    apply = sub.add_parser("apply", help="compress -> distill -> evaluate -> save, as the recipe says")
    apply.add_argument("recipe")
    apply.add_argument("--output", help="checkpoint directory (default: the recipe's output.dir)")
    apply.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe field, e.g. --set stages.1.distill.steps=10")
    apply.set_defaults(run=_apply)

    evaluate = sub.add_parser("eval", help="run lm-eval tasks on a checkpoint, in memory")
    evaluate.add_argument("path", help="checkpoint directory (the output of apply)")
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names (see evals/README.md)")
    evaluate.add_argument("--include-path", help="directory of task YAMLs (default: the repository's evals/)")
    evaluate.add_argument("--limit", type=_limit, help="documents per task (below 1: a fraction)")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--num-fewshot", type=int)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--output", help="also write the results and protocol to this JSON file")
    evaluate.set_defaults(run=_eval)

    compare = sub.add_parser("compare", help="compare checkpoints: comparison.md/.json and a Pareto plot")
    compare.add_argument("paths", nargs="+", help="checkpoint directories written by apply")
    compare.add_argument("-o", "--output", default=".", help="directory for comparison.md/.json and pareto.png")
    compare.add_argument("--metric", default="perplexity",
                         help="y axis of the Pareto plot, e.g. perplexity or lm_eval/TASK/acc")
    compare.add_argument("--no-base", action="store_true", help="leave the base model rows out")
    direction = compare.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher_better", action="store_const", const=True)
    direction.add_argument("--lower-is-better", dest="higher_better", action="store_const", const=False)
    compare.set_defaults(run=_compare)

    push = sub.add_parser("push", help="upload a checkpoint directory to the Hugging Face hub")
    push.add_argument("path", help="checkpoint directory (the output of apply)")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its "
                                                             "visibility)")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes to upload; send nothing")
    push.add_argument("--message", dest="commit_message", help="commit message")
    push.set_defaults(run=_push)
    return parser


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _validate(args) -> int:
    from llmshrink.recipe import load_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    names = ", ".join(stage.name for stage in loaded.stages) or "none"
    count = len(loaded.stages)
    print(f"{args.recipe}: ok ({count} stage{'' if count == 1 else 's'}: {names})")
    return 0


def _apply(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from llmshrink.engine import run_recipe
    from llmshrink.recipe import load_recipe

    hf_logging.set_verbosity_error()  # our own progress lines are the log; keep library chatter out
    hf_logging.disable_progress_bar()
    loaded = load_recipe(args.recipe, args.overrides)
    run_recipe(loaded, output_dir=args.output)
    return 0


def _eval(args) -> int:
    import json

    from llmshrink.checkpoint import load_checkpoint, load_tokenizer
    from llmshrink.eval.lm_eval_bridge import run_lm_eval
    from llmshrink.fileio import atomic_write_text

    model = load_checkpoint(args.path, device=args.device)
    tokenizer = load_tokenizer(args.path)
    out = run_lm_eval(model, tokenizer, args.tasks, include_path=args.include_path, limit=args.limit,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    text = json.dumps(out, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0


def _compare(args) -> int:
    from llmshrink.compare import compare

    compare(args.paths, args.output, metric=args.metric, include_base=not args.no_base,
            higher_better=args.higher_better)
    return 0


def _push(args) -> int:
    from llmshrink.push import push_checkpoint

    push_checkpoint(args.path, args.repo_id, private=args.private, dry_run=args.dry_run,
                    commit_message=args.commit_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
