"""The recipe YAML as typed pydantic models, and loading it with one-line errors.

    name: smollm2-kron
    model: {id: builtin:smollm2-135m}
    data: {source: builtin:shakespeare, fraction: 0.5}
    stages:
      - kronecker: {targets: '.*\\.mlp\\..*', rank: 1}
      - distill: {steps: 100}
    evaluate: {perplexity: {data: {source: builtin:shakespeare, split: test}}}
    output: {dir: out/smollm2-kron}

Each stage is a one-key mapping `{pass name: pass config}`; the pass's own config model validates it.
Everything that can be checked without the model is checked here (types strictly, regexes, templates, local
files), and nothing here imports torch: `llmshrink validate` is fast and prints only its result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from llmshrink.errors import RecipeError, did_you_mean
from llmshrink.eval.specs import (  # noqa: F401 (re-exported: the recipe's evaluate: section)
    PERPLEXITY_BRANCHES,
    EvaluateSpec,
    GenerationSpec,
    LatencySpec,
    LmEvalSpec,
    PerplexitySpec,
)
from llmshrink.export.spec import ExportSpec, check_export_names, check_exports
from llmshrink.planning.spec import SearchSpec, TargetSpec, check_planning
from llmshrink.specs import (
    LOCAL_DATA_SUFFIXES,
    DataSpec,
    MixDataSpec,
    ModelSpec,
    Spec,
    TeacherDataSpec,
    TrainingData,
)
from llmshrink.stages import Stage, describe_error, parse_stage
from llmshrink.task_data import TaskSpec


class OutputSpec(Spec):
    dir: str
    overwrite: bool = Field(False, description="replace an existing checkpoint directory (atomically)")


# Which task kind each encoder model.task is scored on.
TASK_KIND = {"sequence_classification": "classification", "embedding": "similarity"}
# Measurements of a language model's text: not for encoders (their evaluate: section measures `task:`).
_LM_ONLY = ("perplexity", "generation", "lm_eval")


class Recipe(Spec):
    name: str
    description: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec = ModelSpec()
    task: TaskSpec | None = Field(None, description="encoders: the labeled task they are fine-tuned, distilled "
                                  "and scored on")
    data: TrainingData | None = None
    target: TargetSpec | None = Field(None, description="a budget: the planner chooses compression stages that meet "
                                      "it, run before `stages:` (which then hold the recovery)")
    search: SearchSpec | None = Field(None, description="with target: the decisions the planner may take")
    stages: list[Any] = Field(default_factory=list)
    evaluate: EvaluateSpec = EvaluateSpec()
    export: list[ExportSpec] = Field(default_factory=list, description="formats written at the end of apply, into "
                                     "<output>/exports/<name>/ (hf-dense, gguf, onnx)")
    output: OutputSpec

    @field_validator("export")
    @classmethod
    def _unique_export_folders(cls, value: list[ExportSpec]) -> list[ExportSpec]:
        return check_export_names(value)


def check_task(recipe: Recipe, file: str) -> None:
    """An encoder (model.task other than causal_lm) is scored on a `task:` of its kind, not on text."""
    kind = TASK_KIND.get(recipe.model.task)
    if kind is None:
        if recipe.task is not None:
            raise RecipeError(file, "task", "only for encoders (model.task: sequence_classification or embedding); "
                                            "model.task is causal_lm")
        return
    if recipe.task is None:
        raise RecipeError(file, "task", f"required for model.task {recipe.model.task}: the {kind} task it is scored on")
    if recipe.task.kind != kind:
        raise RecipeError(file, "task.kind", f"model.task {recipe.model.task} is scored on a {kind} task, "
                                             f"got {recipe.task.kind!r}")
    source = getattr(recipe.data, "source", None)
    if source in ("teacher", "mix"):
        raise RecipeError(file, "data.source", f"{source} samples text from a causal LM; an encoder's unlabeled text "
                                               "is a corpus: builtin:NAME, a datasets hub id or a local file")
    for key in _LM_ONLY:
        if key in recipe.evaluate.model_fields_set and getattr(recipe.evaluate, key) is not None:
            raise RecipeError(file, f"evaluate.{key}", "measures a language model's text; an encoder is scored on "
                                                       "its task: section (remove it, or set it to null)")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; read it as the float everyone means,
    since strict validation would refuse the string."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    stages: list[Stage]
    path: Path
    text: str  # the exact YAML that ran (after --set overrides), saved beside the checkpoint


def load_recipe(path: str | Path, overrides: list[str] = ()) -> LoadedRecipe:
    """Read, override (`key.path=value`), and validate a recipe. Any problem -> RecipeError (one line)."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError(file, "", "no such recipe file")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(file, "", f"not a YAML text file (not UTF-8: {err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecipeError(file, "", f"cannot read: {err.strerror}") from None
    try:
        raw = yaml.load(source, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise RecipeError(file, where, f"not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(file, "", f"expected a mapping of sections at the top, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, file)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(file, *describe_error(err, Recipe, prefix="", branches=PERPLEXITY_BRANCHES)) from None
    check_task(recipe, file)
    problem = check_planning(recipe.target, recipe.search, recipe.model.task == "causal_lm")
    if problem is not None:
        raise RecipeError(file, *problem)
    problem = check_exports(recipe.export, recipe.model.task == "causal_lm")
    if problem is not None:
        raise RecipeError(file, *problem)
    if recipe.target is not None and recipe.data is None:
        raise RecipeError(file, "data", "required with target: the planner measures each decision on its text")
    stages = [parse_stage(item, file, f"stages[{i}]") for i, item in enumerate(recipe.stages)]
    check_local_files(recipe, file)
    text = yaml.safe_dump(raw, sort_keys=False) if overrides else source
    return LoadedRecipe(recipe, stages, path, text)


def check_local_files(recipe: Recipe, file: str) -> None:
    """The files and built-in names the recipe reads exist now, rather than after the model has loaded
    and a stage has run. Relative paths resolve against the current directory, as `apply` reads them."""
    sources = _training_sources(recipe.data)
    listed = isinstance(recipe.evaluate.perplexity, list)
    for index, spec in enumerate(recipe.evaluate.perplexity_specs):
        sources.append((f"evaluate.perplexity{f'[{index}]' if listed else ''}.data", spec.data))
    for field, spec in sources:
        if spec is not None:
            _check_data_source(spec, file, field)
    generation = recipe.evaluate.generation
    if generation is not None and not generation.data.startswith("builtin:") and not Path(generation.data).is_file():
        where = _relative(generation.data)
        raise RecipeError(file, "evaluate.generation.data", f"file not found: {generation.data}{where}")
    lm_eval = recipe.evaluate.lm_eval
    if lm_eval is not None and lm_eval.include_path is not None and not Path(lm_eval.include_path).is_dir():
        where = _relative(lm_eval.include_path)
        raise RecipeError(file, "evaluate.lm_eval.include_path", f"no such directory: {lm_eval.include_path}{where}")


def _training_sources(data: DataSpec | TeacherDataSpec | MixDataSpec | None) -> list[tuple[str, DataSpec | None]]:
    """(field, text source) of every corpus the `data:` section reads."""
    if isinstance(data, TeacherDataSpec):
        return [("data.prompts", data.prompts)]
    if isinstance(data, MixDataSpec):
        return [("data.corpus", data.corpus), ("data.teacher.prompts", data.teacher.prompts)]
    return [("data", data)]


def _check_data_source(spec: DataSpec, file: str, field: str) -> None:
    from llmshrink.corpus import BUILTIN_CORPORA, SPLIT_ALIASES

    path = Path(spec.source).expanduser()
    suffix = path.suffix.lower()
    if spec.template is not None and (spec.source.startswith("builtin:") or suffix == ".txt"):
        # Plain text has no record fields; the template would be ignored without a word.
        raise RecipeError(file, f"{field}.template", f"{spec.source} is plain text without fields; a template "
                          "needs records (.jsonl, .json, .parquet or a datasets hub id)")
    if spec.source.startswith("builtin:"):
        name = spec.source.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            known = ", ".join(f"builtin:{k}" for k in BUILTIN_CORPORA)
            hint = did_you_mean(name, BUILTIN_CORPORA, prefix="builtin:")
            raise RecipeError(file, f"{field}.source",
                              f"unknown built-in corpus {spec.source!r}{hint}; known: {known}")
        splits = [*BUILTIN_CORPORA[name], *SPLIT_ALIASES]
        if spec.split not in splits:
            raise RecipeError(file, f"{field}.split", f"{spec.source} has no split {spec.split!r}; allowed: "
                              f"{', '.join(splits)}")
        return
    if suffix in LOCAL_DATA_SUFFIXES and not path.is_file():
        raise RecipeError(file, f"{field}.source", f"file not found: {spec.source}{_relative(spec.source)}")
    if suffix not in LOCAL_DATA_SUFFIXES and path.exists():
        raise RecipeError(file, f"{field}.source", f"{spec.source}: unsupported file type {suffix or '(none)'!r}; "
                          f"use {', '.join(LOCAL_DATA_SUFFIXES)}, builtin:NAME or a datasets hub id")


def _relative(path: str) -> str:
    """Where a relative path was looked for (apply reads it from the current directory too)."""
    return "" if Path(path).expanduser().is_absolute() else f" (relative to the current directory {Path.cwd()})"


def apply_override(raw: dict, item: str, file: str) -> None:
    """`stages.0.kronecker.rank=2` sets raw['stages'][0]['kronecker']['rank'] = 2 (value parsed as YAML)."""
    if "=" not in item:
        raise RecipeError(file, f"--set {item}", "expected key.path=value")
    key, value = item.split("=", 1)
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(file, f"--set {where}", f"no item {part!r}; the list has {len(node)} items")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(file, f"--set {where}", f"cannot set a key inside {node!r}")
        if last:
            node[part] = _override_value(item, value, file)
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _override_value(item: str, value: str, file: str) -> Any:
    try:
        return yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(file, f"--set {item}", f"the value is not valid YAML: {problem}") from None
