"""Recipe validation: every shipped recipe is valid; bad input gets one exact line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RECIPE_BASE as BASE

from llmshrink.errors import RecipeError
from llmshrink.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    loaded = load_recipe(path)
    assert loaded.stages, "a shipped recipe has at least one stage"


def test_valid_recipe_parses_stages(tmp_path):
    loaded = load_recipe(write(tmp_path, BASE))
    assert [s.name for s in loaded.stages] == ["kronecker", "distill"]
    assert loaded.stages[0].config.rank == 1
    assert loaded.stages[1].config.steps == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE.replace("rank: 1", "rank: two"),
         "recipe.yaml: stages[0].kronecker.rank: input should be a valid integer, got 'two'"),
        (BASE.replace("rank: 1", "rank: 0"),
         "recipe.yaml: stages[0].kronecker.rank: input should be greater than or equal to 1, got 0"),
        (BASE.replace("rank: 1", "rnak: 1"), "recipe.yaml: stages[0].kronecker.rnak: unknown key; allowed: "),
        (BASE.replace("- distill:", "- distil:"),
         "recipe.yaml: stages[1]: unknown pass 'distil'; did you mean 'distill' or 'task_distill' or 'local_distill'? known passes: "),
        (BASE.replace("model: {id: some/dir}", "model: {id: some/dir, dtyp: float32}"),
         "recipe.yaml: model.dtyp: unknown key; allowed: id, revision, dtype, trust_remote_code, task, num_labels"),
        (BASE.replace("name: t\n", "name: t\nsurprise: 1\n"), "recipe.yaml: surprise: unknown key; allowed: name, "),
        (BASE.replace("output: {dir: out/t}", ""), "recipe.yaml: output: required field is missing"),
        (BASE + "device: tpu\n", "recipe.yaml: device: input should be 'auto', 'cpu' or 'cuda', got 'tpu'"),
        ("- just a list\n", "recipe.yaml: expected a mapping of sections at the top, got list"),
        ("name: [unclosed\n", "recipe.yaml: line 2: not valid YAML"),
    ],
)
def test_bad_recipe_is_one_exact_line(tmp_path, text, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    text_of_error = str(info.value)
    assert "\n" not in text_of_error
    assert text_of_error.replace(str(tmp_path) + "/", "").startswith(message)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: no such recipe file$"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_overrides_fields_and_records_the_text(tmp_path):
    loaded = load_recipe(write(tmp_path, BASE), ["stages.1.distill.steps=7", "evaluate.latency=null"])
    assert loaded.stages[1].config.steps == 7
    assert loaded.recipe.evaluate.latency is None
    assert "steps: 7" in loaded.text


def test_set_override_errors_name_the_path(tmp_path):
    with pytest.raises(RecipeError, match=r"--set stages\.5: no item '5'; the list has 2 items$"):
        load_recipe(write(tmp_path, BASE), ["stages.5.distill.steps=7"])
    with pytest.raises(RecipeError, match=r"--set seed: expected key\.path=value$"):
        load_recipe(write(tmp_path, BASE), ["seed"])
