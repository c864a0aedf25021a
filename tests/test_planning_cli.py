"""`llmshrink plan` and `llmshrink sweep` (issue 18) on a tiny random 6-block Llama.

What these tests show:
- `plan` prints the decision table (whose savings add up to the printed size) and the planned recipe, which
  `validate` accepts; it compresses and writes nothing, except with `-o`, which writes the same text and
  refuses an existing file in one line.
- `sweep --targets 0.9,0.7` writes one checkpoint per budget (each within its budget, each with the plan that
  `plan` prints for it) and comparison.md/.json and pareto.png; a rerun skips both budgets ("done already");
  bad --targets lists are refused in one line; absolute budgets get checkpoint folders of their own.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import WORDS, model_dir, one_line, tiny_llama

import llmshrink.sweep as sweep_module
from llmshrink.cli import main

SEARCH = {"drop_layers": True, "prune_ffn": [0.5, 0.25], "prune_heads": [0.5], "calibration_tokens": 64}
RECOVERY = [{"distill": {"steps": 1, "seq_len": 32, "batch_size": 2}}]
PLANNED_HEADER = "# Planned by llmshrink"
ROW = re.compile(r"^\s*(\d+) \| (.+?)\s+\| +([\d,]+) \| ([+-]\d+\.\d+)$")
SUMMARY = re.compile(r"^params: ([\d,]+) -> ([\d,]+) \(([\d.]+)x; budget ([\d,]+)\), solver (\w+)$", re.M)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning-cli")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS[:20]) for _ in range(12)) for _ in range(200)) + "\n")
    return SimpleNamespace(root=root, text=text, model=model_dir(tiny_llama(layers=6), root / "llama"),
                           cache=root / "llmshrink-cache")


@pytest.fixture(autouse=True)
def cache_env(world, monkeypatch):
    """Plan measurements cached once for the module (under $LLMSHRINK_CACHE/plans)."""
    monkeypatch.setenv("LLMSHRINK_CACHE", str(world.cache))


def write_recipe(path: Path, world, target: dict, out: Path) -> Path:
    recipe = {
        "name": "t", "seed": 0, "model": {"id": str(world.model)}, "data": {"source": str(world.text)},
        "target": target, "search": SEARCH, "stages": RECOVERY,
        "evaluate": {"perplexity": {"data": {"source": str(world.text), "max_tokens": 300}, "window": 32,
                                    "stride": 32}, "latency": None, "memory": False, "after_each_stage": False},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path



def printed_plan(stdout: str) -> tuple[list[tuple[int, str, int]], tuple[int, int, int], str]:
    """`plan`'s output: (table rows as (block, decision, saving), (base, planned, budget), the recipe text)."""
    start = stdout.index(PLANNED_HEADER)
    table, text = stdout[:start], stdout[start:]
    text = text.split("\nwrote ")[0]
    rows = [(int(m[1]), m[2], int(m[3].replace(",", ""))) for m in map(ROW.match, table.splitlines()) if m]
    summary = SUMMARY.search(table)
    assert summary, table
    base, planned, _, budget, _ = summary.groups()
    return rows, tuple(int(v.replace(",", "")) for v in (base, planned, budget)), text


# --- llmshrink plan ----------------------------------------------------------------------------------------------


def test_plan_prints_the_decision_table_and_a_recipe_that_validates(tmp_path, world, capsys):
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.7}, tmp_path / "out")
    assert main(["plan", str(path)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^block \| decision +\| +params saved \| KL increase$", stdout, re.M)
    rows, (base, planned, budget), text = printed_plan(stdout)
    assert budget == int(0.7 * base) and planned <= budget
    assert rows and sum(saving for _, _, saving in rows) == base - planned

    emitted = yaml.safe_load(text)
    assert "target" not in emitted and "search" not in emitted and emitted["stages"][-1:] == RECOVERY
    planned_stages = emitted["stages"][:-1]
    blocks = {layer for stage in planned_stages for config in stage.values() for layer in config["layers"]}
    assert blocks == {block for block, _, _ in rows}
    assert not (tmp_path / "out").exists()  # nothing compressed, nothing written

    (tmp_path / "planned.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "planned.yaml")]) == 0
    assert f"ok ({len(emitted['stages'])} stages" in capsys.readouterr().out

    # --set changes the budget like any field.
    assert main(["plan", str(path), "--set", "target.params=0.5"]) == 0
    _, (_, smaller, budget), _ = printed_plan(capsys.readouterr().out)
    assert budget == int(0.5 * base) and smaller <= budget < planned


def test_plan_output_writes_the_printed_recipe_and_refuses_an_existing_file(tmp_path, world, capsys):
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.8}, tmp_path / "out")
    written = tmp_path / "planned.yaml"
    assert main(["plan", str(path), "-o", str(written)]) == 0
    stdout = capsys.readouterr().out
    _, _, text = printed_plan(stdout)
    assert written.read_text() == text and stdout.rstrip().endswith(f"wrote {written}")

    before = written.read_text()
    assert one_line(capsys, ["plan", str(path), "-o", str(written)]) == (
        f"llmshrink: error: --output: {written} exists; choose a new file (inputs are never overwritten)")
    assert written.read_text() == before


# --- llmshrink sweep ---------------------------------------------------------------------------------------------


def test_sweep_writes_a_checkpoint_per_budget_and_the_comparison_then_resumes(tmp_path, world, capsys):
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.8}, tmp_path / "unused")
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--targets", "0.9,0.7", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    for value in (0.9, 0.7):
        checkpoint = out / f"t-params-{value:g}"
        manifest = json.loads((checkpoint / "llmshrink.json").read_text())
        plan = manifest["plan"]
        assert plan["target"]["params"] == value and plan["target"]["limit"] == int(value * plan["base"]["params"])
        assert plan["measured"]["params"] == plan["predicted"]["params"] <= plan["target"]["limit"]
        assert manifest["metrics"]["compressed"]["params"] == plan["measured"]["params"]
        assert [p["pass"] for p in manifest["passes"]][-1] == "distill"  # recovery after the planned stages
        assert (checkpoint / "planned_recipe.yaml").is_file() and (checkpoint / "plan.json").is_file()
    assert f"sweep: params 0.9 -> {out / 't-params-0.9'}" in stdout
    for name in ("comparison.md", "comparison.json", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    comparison = (out / "comparison.md").read_text()
    assert "t-params-0.9" in comparison and "t-params-0.7" in comparison
    assert not (tmp_path / "unused").exists()

    # The emitted recipe of each budget is what `plan` prints for it (measurements from the same cache).
    assert main(["plan", str(path), "--set", "target.params=0.7"]) == 0
    _, _, text = printed_plan(capsys.readouterr().out)
    emitted = yaml.safe_load((out / "t-params-0.7" / "planned_recipe.yaml").read_text())
    assert yaml.safe_load(text)["stages"] == emitted["stages"]

    # A rerun keeps both checkpoints and compares again.
    weights = {v: (out / f"t-params-{v}" / "model.safetensors").stat().st_mtime_ns for v in ("0.9", "0.7")}
    assert main(["sweep", str(path), "--targets", "0.9,0.7", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"sweep: params 0.9: {out / 't-params-0.9'} is done already" in stdout
    assert f"sweep: params 0.7: {out / 't-params-0.7'} is done already" in stdout
    assert "plan for target" not in stdout
    assert weights == {v: (out / f"t-params-{v}" / "model.safetensors").stat().st_mtime_ns for v in ("0.9", "0.7")}


@pytest.mark.parametrize("targets, message", [
    ("0.9,abc", "--targets: 'abc' is not a number; give budgets like 0.9,0.8,0.7"),
    ("0", "--targets: 0 is not a budget; budgets are finite and > 0 (up to 1: a share of the base)"),
    ("0.9,-0.5", "--targets: -0.5 is not a budget; budgets are finite and > 0 (up to 1: a share of the base)"),
    ("nan", "--targets: nan is not a budget; budgets are finite and > 0 (up to 1: a share of the base)"),
    ("0.9,,0.7", "--targets: '' is not a number; give budgets like 0.9,0.8,0.7"),
    ("0.9,0.90", "--targets: 0.9,0.90 gives a budget twice"),
])
def test_sweep_refuses_bad_targets_in_one_line(tmp_path, world, capsys, targets, message):
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.8}, tmp_path / "out")
    assert one_line(capsys, ["sweep", str(path), f"--targets={targets}"]) == f"llmshrink: error: {message}"
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_an_infinite_budget_in_one_line(tmp_path, world, capsys):
    """inf is refused before any budget runs (the planner would fail on int(inf) after measuring)."""
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.8}, tmp_path / "out")
    assert one_line(capsys, ["sweep", str(path), "--targets=0.9,inf"]).startswith("llmshrink: error: --targets: inf")


def test_plan_and_sweep_of_a_recipe_without_target_are_refused(tmp_path, world, capsys):
    path = write_recipe(tmp_path / "r.yaml", world, {"params": 0.8}, tmp_path / "out")
    raw = yaml.safe_load(path.read_text())
    del raw["target"], raw["search"]
    path.write_text(yaml.safe_dump(raw))
    assert one_line(capsys, ["sweep", str(path), "--targets", "0.9"]).startswith(
        f"llmshrink: error: {path}: sweep needs a target: section")
    assert one_line(capsys, ["plan", str(path)]).startswith(f"llmshrink: error: {path}: target: has no budget")


def test_sweep_gives_absolute_budgets_folders_of_their_own(tmp_path, world, monkeypatch):
    """Absolute byte counts differ beyond 6 digits: each budget needs its own checkpoint (not '1.23457e+06')."""
    ran = []

    def fake_run(loaded, output_dir=None, log=print, **kwargs):
        ran.append((loaded.recipe.target.value, output_dir))
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "llmshrink.json").write_text("{}")

    monkeypatch.setattr(sweep_module, "run_recipe", fake_run)
    monkeypatch.setattr(sweep_module, "compare", lambda paths, out, log=print: {"paths": [str(p) for p in paths]})
    path = write_recipe(tmp_path / "r.yaml", world, {"bytes": 0.5}, tmp_path / "out")
    sweep_module.sweep(path, [1_234_567.0, 1_234_568.0], tmp_path / "sweep", log=lambda _: None)
    assert [value for value, _ in ran] == [1_234_567.0, 1_234_568.0], "the second budget was taken as done"
    assert len({folder for _, folder in ran}) == 2
