"""What `llmshrink validate` catches without loading a model: regexes, templates, local files, shapes, strict
types, bad --set values. Each mistake is one exact line."""

from __future__ import annotations

import pytest
from conftest import RECIPE_BASE as BASE

from llmshrink.errors import RecipeError
from llmshrink.recipe import load_recipe

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
        "known: builtin:shakespeare, builtin:python_docs")
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


def test_distill_loss_choice_and_its_weights(in_tmp):
    distill = load(BASE.replace("steps: 2", "steps: 2, loss: reverse_kl")).stages[1].config
    assert (distill.loss, distill.skew, distill.jsd_beta) == ("reverse_kl", 0.1, 0.5)
    assert load(BASE).stages[1].config.loss == "forward_kl"  # the default keeps every recipe's numbers
    assert load(BASE.replace("steps: 2", "steps: 2, loss: skew_rkl, skew: 0.3")).stages[1].config.skew == 0.3
    assert error_of(BASE.replace("steps: 2", "steps: 2, loss: kl")) == (
        "recipe.yaml: stages[1].distill.loss: input should be 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl' or "
        "'skew_rkl', got 'kl'")
    assert error_of(BASE.replace("steps: 2", "steps: 2, loss: skew_kl, skew: 1")) == (
        "recipe.yaml: stages[1].distill.skew: input should be less than 1, got 1")
    assert error_of(BASE.replace("steps: 2", "steps: 2, loss: jsd, jsd_beta: 0")) == (
        "recipe.yaml: stages[1].distill.jsd_beta: input should be greater than 0, got 0")


def test_perplexity_stride_must_fit_the_window(in_tmp):
    text = BASE + "evaluate: {perplexity: {window: 32, stride: 256}}\n"
    assert error_of(text) == "recipe.yaml: evaluate.perplexity.stride: must be at most the window (32), got 256"
    assert load(BASE + "evaluate: {perplexity: {window: 32, stride: 32}}\n").recipe.evaluate.perplexity.stride == 32


TWO = """\
evaluate:
  perplexity:
    - {name: plays, data: {source: builtin:shakespeare, split: test}, window: 32, stride: 16}
    - {name: docs, domain: out, data: {source: builtin:python_docs, split: test}, window: 64, stride: 64}
"""


def test_perplexity_takes_a_list_of_named_datasets(in_tmp):
    specs = load(BASE + TWO).recipe.evaluate.perplexity_specs
    assert [(s.label, s.domain, s.window) for s in specs] == [("plays", "in", 32), ("docs", "out", 64)]
    # One spec as before: named after its data source.
    (one,) = load(BASE + "evaluate: {perplexity: {data: {source: builtin:python_docs, split: test}}}\n") \
        .recipe.evaluate.perplexity_specs
    assert (one.label, one.domain) == ("python_docs", "in")
    assert error_of(BASE + TWO.replace("name: docs", "name: plays")) == (
        "recipe.yaml: evaluate.perplexity[1].name: duplicate name 'plays' (also evaluate.perplexity[0]); each "
        "dataset needs its own name")
    # Unnamed items default to their source's name, so two unnamed Shakespeare specs clash too.
    assert error_of(BASE + "evaluate: {perplexity: [{window: 32}, {window: 64}]}\n") == (
        "recipe.yaml: evaluate.perplexity[1].name: duplicate name 'shakespeare' (also evaluate.perplexity[0]); "
        "each dataset needs its own name")
    assert error_of(BASE + TWO.replace("window: 64, stride: 64", "window: 64, stride: 65")) == (
        "recipe.yaml: evaluate.perplexity[1].stride: must be at most the window (64), got 65")
    assert error_of(BASE + TWO.replace("domain: out", "domain: outside")) == (
        "recipe.yaml: evaluate.perplexity[1].domain: input should be 'in' or 'out', got 'outside'")
    assert error_of(BASE + TWO.replace("split: test}, window: 64", "split: train}, window: 64")) == (
        "recipe.yaml: evaluate.perplexity[1].data.split: builtin:python_docs has no split 'train'; allowed: test, "
        "validation")
    assert error_of(BASE + TWO, ["evaluate.perplexity.1.window=8"]) == (
        "recipe.yaml: evaluate.perplexity[1].stride: must be at most the window (8), got 64")
