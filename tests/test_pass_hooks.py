"""Pass lifecycle hooks (passes/base.py): the engine calls those of the passes that ran, in order, and names no
pass itself. Two fake passes each add to the model something its checkpoint does not hold (a forward hook that
shifts the logits), keep it beside the checkpoint (save_extra) and put it back for the reload check."""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import tokenize
import types
from pathlib import Path

import pytest

import llmshrink.engine as engine
from llmshrink import registry
from llmshrink.passes.base import Extra, PassConfig, PassHooks
from llmshrink.recipe import load_recipe
from llmshrink.registry import get_pass, passes_run, register_pass

SHIFTS = {"hook_a": 0.5, "hook_b": 0.25}  # what each fake pass adds to every logit


class HookConfig(PassConfig):
    note: str = ""


def fake_pass(name: str, events: list) -> types.ModuleType:
    """An implementation module with apply and every hook; each call is appended to `events`."""
    module = types.ModuleType(f"fake_pass_{name}")
    handles = {}  # id(model) -> the forward hook that shifts its logits

    def shift(model) -> None:
        handles[id(model)] = model.lm_head.register_forward_hook(lambda _m, _i, out: out + SHIFTS[name])

    def apply(model, cfg, ctx):
        events.append(("apply", name, model))
        if id(model) not in handles:  # a pass may run in several stages: it adds its shift once
            shift(model)
        return {"note": cfg.note}

    def finalize(model, ctx):
        events.append(("finalize", name, model, ctx.work_dir))
        return f"{name}: finalized" if name == "hook_a" else None

    def save_extra(model, directory: Path):
        events.append(("save_extra", name, model, directory, directory.exists()))
        directory.mkdir()
        (directory / "shift.json").write_text(json.dumps(SHIFTS[name]))
        return Extra(f"extra_{name}", {"shift": SHIFTS[name]})

    def unload_extra(model):
        events.append(("unload_extra", name, model))
        handles.pop(id(model)).remove()

    def load_extra(model, directory: Path):
        events.append(("load_extra", name, model, directory.name, sorted(p.name for p in directory.iterdir())))
        assert json.loads((directory / "shift.json").read_text()) == SHIFTS[name]
        shift(model)
        return model

    for hook in (apply, finalize, save_extra, unload_extra, load_extra):
        setattr(module, hook.__name__, hook)
    return module


@pytest.fixture
def events(monkeypatch) -> list:
    """hook_a and hook_b registered (and gone after the test), recording their calls."""
    registry.pass_names()  # the built-in passes, registered before the copy that the test may change
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    calls: list = []
    for name in SHIFTS:
        monkeypatch.setitem(sys.modules, f"fake_pass_{name}", fake_pass(name, calls))
        register_pass(name, module=f"fake_pass_{name}")(type(f"{name}Config", (HookConfig,), {}))
    return calls


def recipe_text(model_dir, text_file, out_dir) -> str:
    return f"""\
name: tiny-hooks
model: {{id: {model_dir}}}
stages:
  - hook_a: {{note: first}}
  - hook_b: {{}}
  - hook_a: {{note: again}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 200}}, window: 32, stride: 16}}
  latency: null
  macs: false
  memory: false
  after_each_stage: false
output: {{dir: {out_dir}}}
"""


def test_engine_calls_the_hooks_of_the_passes_that_ran_in_order(tmp_path, tiny_model_dir, tiny_text, events):
    out = tmp_path / "out"
    path = tmp_path / "hooks.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))
    lines: list[str] = []
    manifest = engine.run_recipe(load_recipe(path), log=lines.append)

    model = events[0][2]
    assert [e[:2] for e in events[:3]] == [("apply", "hook_a"), ("apply", "hook_b"), ("apply", "hook_a")]
    # finalize: once per pass, in the order they first ran, on the model the stages changed, with no stage folder
    assert events[3:5] == [("finalize", "hook_a", model, None), ("finalize", "hook_b", model, None)]
    # saving: the pass that ran last comes off first; each writes a new folder in the work folder
    work = engine.work_dir_for(out)
    assert events[5:9] == [
        ("save_extra", "hook_b", model, work / "extra-hook_b.partial", False), ("unload_extra", "hook_b", model),
        ("save_extra", "hook_a", model, work / "extra-hook_a.partial", False), ("unload_extra", "hook_a", model),
    ]
    # the reload check: back on the reloaded checkpoint (another model), in the order the passes ran
    reloaded = events[9][2]
    assert reloaded is not model
    assert events[9:] == [("load_extra", "hook_a", reloaded, "extra_hook_a", ["shift.json"]),
                          ("load_extra", "hook_b", reloaded, "extra_hook_b", ["shift.json"])]

    finalized = lines.index("  hook_a: finalized")  # hook_b returned None: no line
    assert lines[finalized - 1:finalized + 2] == ["[4/8] hook_a", "  hook_a: finalized", "[5/8] evaluate base model"]
    assert [p["record"] for p in manifest["passes"]] == [{"note": "first"}, {"note": ""}, {"note": "again"}]
    assert manifest["extra_hook_a"] == {"shift": 0.5} and manifest["extra_hook_b"] == {"shift": 0.25}
    assert list(manifest)[list(manifest).index("extra_hook_a") + 1] == "extra_hook_b"
    # without its extra the checkpoint reloads exactly; with them back, the logits are those before the save
    assert manifest["checks"] == {"reload_max_abs_logit_diff": 0.0, "extra_hook_a_reload_max_abs_logit_diff": 0.0,
                                  "extra_hook_b_reload_max_abs_logit_diff": 0.0}
    assert json.loads((out / "extra_hook_b" / "shift.json").read_text()) == 0.25
    assert json.loads((out / "llmshrink.json").read_text())["extra_hook_a"] == {"shift": 0.5}
    assert not work.exists()


def test_a_wrong_extra_fails_the_reload_check(tmp_path, tiny_model_dir, tiny_text, events, monkeypatch):
    out = tmp_path / "out"
    path = tmp_path / "hooks.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))
    implementation = sys.modules["fake_pass_hook_b"]
    monkeypatch.setattr(implementation, "load_extra", lambda model, directory: model)  # forgets the shift
    with pytest.raises(engine.LlmshrinkError, match=r"the reloaded extra_hook_b changes the logits by 0\.25$"):
        engine.run_recipe(load_recipe(path), log=lambda line: None)
    assert not out.exists() and not engine.work_dir_for(out).exists()


def test_passes_run_lists_each_pass_once_with_those_a_pass_runs_itself(events):
    outer = sys.modules["fake_pass_hook_a"]
    inner_apply = outer.apply

    def apply_with_inner(model, cfg, ctx):  # as iterate runs its inner stages
        get_pass("hook_b").apply(model, cfg, ctx)
        return inner_apply(model, cfg, ctx)

    outer.apply = apply_with_inner
    model = types.SimpleNamespace(lm_head=types.SimpleNamespace(register_forward_hook=lambda hook: None))
    with passes_run() as ran:
        for _ in range(2):
            get_pass("hook_a").apply(model, HookConfig(), None)
    assert [spec.name for spec in ran] == ["hook_a", "hook_b"]
    with passes_run() as again:
        pass
    assert again == []


def test_hooks_are_looked_up_in_the_implementation_and_come_in_a_set(events):
    hooks = get_pass("hook_a").hooks
    assert hooks.finalize is sys.modules["fake_pass_hook_a"].finalize
    assert get_pass("kronecker").hooks == PassHooks()  # a pass without hooks
    with pytest.raises(TypeError, match="save_extra, unload_extra and load_extra together"):
        PassHooks(save_extra=hooks.save_extra)


def test_the_engine_names_no_pass():
    source = Path(engine.__file__).read_text()
    tree = ast.parse(source)
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert [m for m in imported if m.startswith("llmshrink.passes") and m != "llmshrink.passes.base"] == []
    # No pass's name in the code (identifiers and strings; imports and comments aside), whatever its case.
    code = " ".join(
        token.string.lower() for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type in (tokenize.NAME, tokenize.STRING) and not token.line.lstrip().startswith(("from ", "import "))
    )
    assert [name for name in registry.pass_names() if re.search(rf"(?<![a-z]){name}(?![a-z])", code)] == []
    assert "lora" not in source.lower() and "adapter" not in source.lower()
