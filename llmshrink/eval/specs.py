"""The recipe's evaluate: section (perplexity datasets, latency, generation, lm_eval), without torch, lm_eval or
metric libraries, so a recipe validates fast; evaluator.py, generation.py and lm_eval_bridge.py run them.
Also what an evaluate.generation section means (its file, fields and prompt): resolve_task."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.errors import LlmshrinkError, did_you_mean
from llmshrink.eval import EVALS_DIR
from llmshrink.fields import first_repeat
from llmshrink.specs import LOCAL_DATA_SUFFIXES, DataSpec, Spec

SUMMARY_PROMPT = "Summarize the dialogue.\n{input}\nSummary:"
DATA_TO_TEXT_PROMPT = "Describe the restaurant in one sentence.\n{input}\nDescription:"
EVALS_DATA = EVALS_DIR / "data"


class GenerationSpec(Spec):
    """`evaluate.generation:` greedy generation on a jsonl file, scored against its references."""

    data: str = Field(
        "builtin:dialogue_summaries",
        description="a .jsonl file (relative to the current directory), builtin:dialogue_summaries or "
                    "builtin:data_to_text (their test files in the package's llmshrink/evals/data)",
    )
    input_field: str | None = Field(None, description="record field put into the prompt; default: the "
                                                       "built-in set's, else 'dialogue'")
    target_field: str | None = Field(None, description="record field with the reference (a string or a list "
                                                        "of strings); default: the built-in set's, else 'summary'")
    prompt: str | None = Field(None, description="template with {input}; default: the built-in set's, else "
                                                 "a summarisation prompt")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="score only the first N records")
    stop_at_newline: bool = Field(True, description="keep only the first line of each generated text")
    metrics: list[Literal["rouge", "bleu", "meteor"]] = Field(
        default_factory=lambda: ["rouge", "bleu"], min_length=1,
        description="meteor needs nltk's WordNet corpus, so it is off unless listed",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_input(cls, value: str | None) -> str | None:
        if value is not None and "{input}" not in value:
            raise ValueError(f"prompt {value!r} has no {{input}} placeholder; the record's input goes there")
        return value

    def resolve(self) -> GenerationTask:
        """The file, fields and prompt template this section means; errors name the missing file or set."""
        return resolve_task(self)


class LmEvalSpec(Spec):
    """A recipe's `evaluate.lm_eval:` section; the fields are run_lm_eval's keyword arguments."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names, or task YAML paths")
    include_path: str | None = Field(None, description="directory of task YAMLs; default: the package's llmshrink/evals/")
    limit: int | float | None = Field(
        None, gt=0, description="at most this many documents per task (below 1: this fraction of them)"
    )
    batch_size: int = Field(1, ge=1)
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; default: each task's own")


@dataclass(frozen=True)
class GenerationTask:
    """A resolved evaluate.generation section: the file to read and how to turn a record into a prompt."""

    path: Path
    input_field: str
    target_field: str
    prompt: str


@dataclass(frozen=True)
class _Builtin:
    file: str
    input_field: str
    target_field: str
    prompt: str


BUILTIN_GENERATION_DATA = {
    "dialogue_summaries": _Builtin("dialogue_summaries_test.jsonl", "dialogue", "summary", SUMMARY_PROMPT),
    "data_to_text": _Builtin("data_to_text_test.jsonl", "meaning_representation", "reference",
                             DATA_TO_TEXT_PROMPT),
}
# A local file without explicit fields is read as a summarisation set.
_FILE_DEFAULTS = _Builtin("", "dialogue", "summary", SUMMARY_PROMPT)

FIELD = "evaluate.generation"


def resolve_task(spec: GenerationSpec) -> GenerationTask:
    """The file, fields and prompt template an evaluate.generation section means (GenerationSpec.resolve)."""
    if spec.data.startswith("builtin:"):
        name = spec.data.removeprefix("builtin:")
        if name not in BUILTIN_GENERATION_DATA:
            known = ", ".join(f"builtin:{k}" for k in BUILTIN_GENERATION_DATA)
            hint = did_you_mean(name, BUILTIN_GENERATION_DATA, prefix="builtin:")
            raise LlmshrinkError(f"{FIELD}.data: unknown built-in set '{spec.data}'{hint}; known: {known}")
        defaults = BUILTIN_GENERATION_DATA[name]
        path = EVALS_DATA / defaults.file
        if not path.is_file():
            raise LlmshrinkError(
                f"{FIELD}.data: {spec.data} is read from the package's llmshrink/evals/data, but {path} does "
                f"not exist (llmshrink installed without its package data?); reinstall llmshrink or give a "
                f".jsonl path"
            )
    else:
        defaults, path = _FILE_DEFAULTS, Path(spec.data)
        if not path.is_file():
            raise LlmshrinkError(
                f"{FIELD}.data: {path} does not exist (relative paths resolve against the current directory "
                f"{Path.cwd()}); give a .jsonl file or builtin:{'|builtin:'.join(BUILTIN_GENERATION_DATA)}"
            )
    return GenerationTask(path, spec.input_field or defaults.input_field,
                          spec.target_field or defaults.target_field, spec.prompt or defaults.prompt)


class PerplexitySpec(Spec):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$",
                             description="how reports name this dataset; defaults to the data source's name")
    domain: Literal["in", "out"] = Field("in", description="out: a text the recovery never saw (compare plots it)")
    data: DataSpec = DataSpec(split="test")
    window: int = Field(512, ge=2, description="tokens the model sees at once")
    stride: int = Field(256, ge=1, description="new tokens scored per window")
    batch_size: int = Field(1, ge=1)
    add_bos: bool = Field(False, description="prepend the BOS token to every window")

    @field_validator("stride")
    @classmethod
    def _stride_fits_window(cls, stride: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and stride > window:
            raise PydanticCustomError("stride", "must be at most the window ({window})", {"window": window})
        return stride

    @property
    def label(self) -> str:
        """The name, else the data source's: builtin:shakespeare -> shakespeare, held/out.txt -> out."""
        if self.name is not None:
            return self.name
        source = self.data.source.removeprefix("builtin:").rstrip("/")
        path = Path(source)
        stem = path.stem if path.suffix.lower() in LOCAL_DATA_SUFFIXES else path.name
        return re.sub(r"[^\w.-]+", "-", stem).strip("-.") or "text"


# Pydantic names the branch of the one-or-list union in error paths; describe_error leaves these names out.
_ONE, _LIST = "one perplexity spec", "list of perplexity specs"
PERPLEXITY_BRANCHES = (_ONE, _LIST)


def _one_or_list(value: Any) -> str:
    return _LIST if isinstance(value, list) else _ONE


PerplexitySpecs = Annotated[
    Annotated[PerplexitySpec, Tag(_ONE)] | Annotated[list[PerplexitySpec], Tag(_LIST)], Discriminator(_one_or_list)
]


class LatencySpec(Spec):
    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(1, ge=1)
    repeats: int = Field(3, ge=1)


class EvaluateSpec(Spec):
    perplexity: PerplexitySpecs | None = Field(
        PerplexitySpec(), description="one spec, or a list of named ones: the first is the primary one"
    )
    latency: LatencySpec | None = LatencySpec()
    generation: GenerationSpec | None = Field(None, description="greedy generation scored with ROUGE/BLEU/METEOR")
    lm_eval: LmEvalSpec | None = Field(None, description="lm-eval tasks (registry names or llmshrink/evals/ YAMLs)")
    macs: bool = Field(True, description="MACs per token (prefill and decode), counted from the modules")
    memory: bool = Field(True, description="peak RAM while loading and generating, each in a fresh process")
    after_each_stage: bool = Field(True, description="perplexity after every stage, not only at the end")

    @field_validator("perplexity")
    @classmethod
    def _unique_names(cls, value: Any) -> Any:
        repeat = first_repeat([spec.label for spec in value]) if isinstance(value, list) else None
        if repeat is not None:
            index, first = repeat
            raise PydanticCustomError(
                "duplicate_name", "duplicate name '{name}' (also evaluate.perplexity[{first}]); each dataset needs "
                "its own name", {"name": value[index].label, "first": first, "index": index})
        return value

    @property
    def perplexity_specs(self) -> list[PerplexitySpec]:
        """The perplexity datasets, the primary one first; [] when perplexity is off."""
        if self.perplexity is None:
            return []
        return list(self.perplexity) if isinstance(self.perplexity, list) else [self.perplexity]
