"""The recipe's evaluate.generation and evaluate.lm_eval sections, without torch, lm_eval or metric
libraries, so a recipe validates fast; generation.py and lm_eval_bridge.py run them (and re-export these).
Also what an evaluate.generation section means (its file, fields and prompt): resolve_task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from llmshrink.errors import LlmshrinkError, did_you_mean
from llmshrink.eval import EVALS_DIR
from llmshrink.specs import Spec

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
