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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
