"""What `llmshrink validate` catches without loading a model: regexes, templates, local files, shapes, strict
types, bad --set values. Each mistake is one exact line."""

from __future__ import annotations

import pytest

from llmshrink.errors import RecipeError
from llmshrink.recipe import load_recipe

BASE = """\
name: t
model: {id: some/dir}
stages:
  - kronecker: {targets: '.*mlp.*', rank: 1}
  - distill: {steps: 2}
output: {dir: out/t}
"""
TEMPLATE_ALLOWED = "allowed: named record fields like {dialogue}, and {{ or }} for a literal brace"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory: relative data paths resolve against it, as `apply` reads them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_of(text: str, overrides: list[str] = ()) -> str:
    with open("recipe.yaml", "w") as f:
        f.write(text)
    with pytest.raises(RecipeError) as info:
        load_recipe("recipe.yaml", list(overrides))
    return str(info.value)


def load(text: str, overrides: list[str] = ()):
    with open("recipe.yaml", "w") as f:
        f.write(text)
    return load_recipe("recipe.yaml", list(overrides))


@pytest.mark.parametrize("text, message", [
    (BASE.replace("targets: '.*mlp.*'", "targets: '(mlp'"),
     "stages[0].kronecker.targets: not a valid regex (missing ), unterminated subpattern at position 0), got '(mlp'"),
    (BASE.replace("rank: 1", "rank: 1, exclude: 'a[b'"),
     "stages[0].kronecker.exclude: not a valid regex (unterminated character set at position 1), got 'a[b'"),
    (BASE.replace("- distill: {steps: 2}", "- lora: {targets: ['q_proj', '*v']}"),
     "stages[1].lora.targets: not a valid regex (nothing to repeat at position 0), got ['q_proj', '*v']"),
    (BASE.replace("- distill: {steps: 2}", "- iterate: {stages: [{kronecker: {targets: '('}}]}"),
     "stages[1].iterate.stages[0].kronecker.targets: not a valid regex (missing ), unterminated subpattern at "
     "position 0), got '('"),
    (BASE.replace("- distill: {steps: 2}", "- quantize: {method: int8-dynamic, exclude: '+'}"),
     "stages[1].quantize.exclude: not a valid regex (nothing to repeat at position 0), got '+'"),
])
def test_every_regex_compiles_when_the_recipe_is_read(in_tmp, text, message):
    assert error_of(text) == f"recipe.yaml: {message}"


@pytest.mark.parametrize("template, message", [
    ("a {0} b", "{0} is not a named field"),
    ("a {} b", "{} is not a named field"),
    ("{a.b}", "{a.b} is not a named field"),
    ("{a!r}", "{a!r} is not a named field"),
    ("{a:>9}", "{a:>9} is not a named field"),
    ("a {dialogue b", "unbalanced braces (expected '}' before end of string)"),
    ("a } b", "unbalanced braces (Single '}' encountered in format string)"),
])
def test_template_takes_only_named_fields(in_tmp, template, message):
    text = BASE + f"data: {{source: wikitext, template: '{template}'}}\n"
    assert error_of(text) == f"recipe.yaml: data.template: {message}; {TEMPLATE_ALLOWED}, got {template!r}"


def test_template_needs_records(in_tmp):
    assert error_of(BASE + "data: {source: 'builtin:shakespeare', template: '{text}'}\n") == (
        "recipe.yaml: data.template: builtin:shakespeare is plain text without fields; a template needs records "
        "(.jsonl, .json, .parquet or a datasets hub id)")
    (in_tmp / "a.txt").write_text("text\n")
    assert error_of(BASE + "data: {source: a.txt, template: '{text}'}\n").startswith(
        "recipe.yaml: data.template: a.txt is plain text without fields;")


def test_good_template_and_literal_braces_pass(in_tmp):
    text = BASE + "data: {source: wikitext, template: \"{{json}}: {dialogue}\\nSummary: {summary}\"}\n"
    assert load(text).recipe.data.template == "{{json}}: {dialogue}\nSummary: {summary}"


def test_local_data_files_must_exist(in_tmp):
    where = f"(relative to the current directory {in_tmp})"
    assert error_of(BASE + "data: {source: train.jsonl}\n") == \
        f"recipe.yaml: data.source: file not found: train.jsonl {where}"
    assert error_of(BASE + "evaluate: {perplexity: {data: {source: held/out.txt}}}\n") == \
        f"recipe.yaml: evaluate.perplexity.data.source: file not found: held/out.txt {where}"
    assert error_of(BASE + "data: {source: /nonexistent/train.parquet}\n") == \
        "recipe.yaml: data.source: file not found: /nonexistent/train.parquet"
    (in_tmp / "corpus").mkdir()
    assert error_of(BASE + "data: {source: corpus}\n") == (
        "recipe.yaml: data.source: corpus: unsupported file type '(none)'; use .txt, .jsonl, .json, .parquet, "
        "builtin:NAME or a datasets hub id")
    assert error_of(BASE + "evaluate: {generation: {data: my.jsonl}}\n") == \
        f"recipe.yaml: evaluate.generation.data: file not found: my.jsonl {where}"
    assert error_of(BASE + "evaluate: {lm_eval: {tasks: [x], include_path: tasks/}}\n") == \
        f"recipe.yaml: evaluate.lm_eval.include_path: no such directory: tasks/ {where}"
    (in_tmp / "train.jsonl").write_text('{"text": "hello"}\n')
    assert load(BASE + "data: {source: train.jsonl}\n").recipe.data.source == "train.jsonl"


def test_hub_ids_and_builtin_names(in_tmp):
    # A hub id is no local path: it is checked when apply loads it, not here.
    assert load(BASE + "data: {source: wikitext, config: wikitext-103-raw-v1}\n").recipe.data.source == "wikitext"
    assert error_of(BASE + "data: {source: 'builtin:shakespear'}\n") == (
        "recipe.yaml: data.source: unknown built-in corpus 'builtin:shakespear' (did you mean builtin:shakespeare?); "
        "known: builtin:shakespeare")
    assert error_of(BASE + "data: {source: 'builtin:shakespeare', split: dev}\n") == \
        "recipe.yaml: data.split: builtin:shakespeare has no split 'dev'; allowed: train, test, validation"


def test_shapes_that_cannot_factor_fail_without_the_model(in_tmp):
    text = BASE.replace("- kronecker: {targets: '.*mlp.*', rank: 1}", "- tensorize: {method: tt, rank: [4, 4]}")
    assert error_of(text) == (
        "recipe.yaml: stages[0].tensorize: value error, rank [4, 4] has 2 entries; tt on a 4-mode tensor needs 3 "
        "(one per bond between neighbouring modes), got {'method': 'tt', 'rank': [4, 4]}")
    text = BASE.replace("rank: 1", "rank: 1, a_shape: [0, 4]")
    assert error_of(text) == "recipe.yaml: stages[0].kronecker.a_shape[0]: input should be greater than 0, got 0"
    text = BASE.replace("rank: 1", "rank: 1, a_shape: [2, 3, 4]")
    assert error_of(text) == "recipe.yaml: stages[0].kronecker.a_shape: tuple should have at most 2 items after " \
        "validation, not 3, got (2, 3, 4)"


@pytest.mark.parametrize("text, message", [
    (BASE.replace("rank: 1", "rank: 1, select_layers: true"),
     "stages[0].kronecker.select_layers: input should be a valid integer, got True"),
    (BASE.replace("rank: 1", "rank: 1, a_shape: [true, 2]"),
     "stages[0].kronecker.a_shape[0]: input should be a valid integer, got True"),
    (BASE.replace("steps: 2", "steps: '2'"), "stages[1].distill.steps: input should be a valid integer, got '2'"),
    (BASE.replace("steps: 2", "steps: 2.5"), "stages[1].distill.steps: input should be a valid integer, got 2.5"),
    (BASE + "evaluate: {perplexity: {add_bos: 1}}\n",
     "evaluate.perplexity.add_bos: input should be a valid boolean, got 1"),
    (BASE + "seed: 'yes'\n", "seed: input should be a valid integer, got 'yes'"),
])
def test_no_lax_coercion(in_tmp, text, message):
    assert error_of(text) == f"recipe.yaml: {message}"


def test_strict_types_still_take_what_yaml_writes(in_tmp):
    text = BASE.replace("rank: 1", "rank: 1, a_shape: [4, 8], ratio: 1.0e-1").replace(
        "steps: 2", "steps: 2, lr: 1e-3, alpha: 1, layer_map: [[0, 0], [2, 4]]")
    kron, distill = (stage.config for stage in load(text).stages)
    assert kron.a_shape == (4, 8) and kron.ratio == 0.1
    assert distill.lr == 0.001 and distill.alpha == 1.0 and distill.layer_map == [(0, 0), (2, 4)]
    loaded = load(BASE, ["stages.1.distill.steps=10", "stages.1.distill.lr=2e-4", "stages.0.kronecker.a_shape=[2, 3]"])
    assert loaded.stages[1].config.steps == 10 and loaded.stages[1].config.lr == 2e-4
    assert loaded.stages[0].config.a_shape == (2, 3)


def test_set_with_bad_yaml_is_one_line(in_tmp):
    assert error_of(BASE, ["name=[unclosed"]) == \
        "recipe.yaml: --set name=[unclosed: the value is not valid YAML: expected ',' or ']', but got '<stream end>'"
    assert error_of(BASE, ["stages.1.distill.steps=true"]) == \
        "recipe.yaml: stages[1].distill.steps: input should be a valid integer, got True"
