"""The recipe's evaluate.generation and evaluate.lm_eval sections, without torch, lm_eval or metric
libraries, so a recipe validates fast; generation.py and lm_eval_bridge.py run them (and re-export these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from llmshrink.specs import Spec

if TYPE_CHECKING:
    from llmshrink.eval.generation import GenerationTask


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
        from llmshrink.eval.generation import resolve_task

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
