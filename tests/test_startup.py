"""`llmshrink validate` is fast and quiet: reading a recipe imports no torch (nor transformers, peft,
bitsandbytes, lm_eval, datasets), and a pass's implementation is imported only when the pass runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "lm_eval", "datasets")
CLI = Path(sys.executable).with_name("llmshrink")

VALIDATE_ALL = """
import json, sys
from llmshrink.recipe import load_recipe
from llmshrink.registry import get_pass, pass_names
for path in sys.argv[1:]:
    load_recipe(path)
before = {name: get_pass(name).module in sys.modules for name in pass_names()}
heavy = sorted(m for m in HEAVY if m in sys.modules)
get_pass("kronecker").hooks  # looking its hooks up imports the implementation, as running it does
print(json.dumps({"heavy": heavy, "imported_before_run": [n for n, seen in before.items() if seen],
                  "kronecker_after_run": "llmshrink.passes.kronecker" in sys.modules}))
""".replace("HEAVY", repr(HEAVY))


def test_validating_every_recipe_imports_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", VALIDATE_ALL, *map(str, RECIPES)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"heavy": [], "imported_before_run": [], "kronecker_after_run": True}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_validate_prints_one_line_and_nothing_on_stderr(path):
    done = subprocess.run([str(CLI), "validate", str(path.relative_to(ROOT))], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path.relative_to(ROOT)}: ok ("), done.stdout


def test_every_pass_runs_the_config_it_registers():
    import importlib

    from llmshrink.registry import get_pass, pass_names

    for name in pass_names():
        spec = get_pass(name)
        implementation = importlib.import_module(spec.module)
        assert callable(implementation.apply), name
        assert getattr(implementation, spec.config_cls.__name__) is spec.config_cls, name  # re-exported


def test_quantize_config_names_the_bnb_methods_as_bnb_does():
    from llmshrink import bnb
    from llmshrink.passes.configs import quantize

    assert quantize.BNB_METHODS == bnb.METHODS
    assert quantize.BNB_FOUR_BIT == tuple(bnb.FOUR_BIT)
