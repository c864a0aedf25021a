"""Typed recipe sections that several modules read: where a model and a text come from.

These are pydantic models with extra="forbid" (a misspelt key is an error, never ignored) and strict types
(`add_bos: 1` or `max_tokens: "512"` is an error, not silently converted; an int is still a valid float).
Torch-free: validating a recipe imports them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import Template

# Local data files by suffix; any other source is builtin:NAME or a datasets hub id.
LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(Spec):
    """The base model: a hub id, a local directory, a .gguf file, or a built-in name, and what it is for.

    `task`: `causal_lm` (a decoder with its LM head), `sequence_classification` (a BERT-family encoder with a
    classifier head of `num_labels` outputs; left unset, the model's own config decides and the engine may fill
    it in from the task data), or `embedding` (the bare encoder; sentence embeddings are its mean-pooled
    last hidden states, as sentence-transformers computes them).
    """

    id: str = Field("builtin:smollm2-135m", description="hub id, local dir, .gguf file or builtin:NAME")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    task: Literal["causal_lm", "sequence_classification", "embedding"] = Field(
        "causal_lm", description="causal_lm (decoders), sequence_classification or embedding (BERT-family encoders)",
    )
    num_labels: int | None = Field(
        None, ge=1, description="classifier outputs for task sequence_classification (1: regression)",
    )

    @field_validator("num_labels")
    @classmethod
    def _labels_need_classification(cls, value: int | None, info: ValidationInfo) -> int | None:
        task = info.data.get("task")
        if value is not None and task not in (None, "sequence_classification"):
            # A setting that would silently do nothing is an error (CONTRIBUTING: no options that do nothing).
            raise PydanticCustomError(
                "num_labels", "only for task sequence_classification (task is {task})", {"task": task})
        return value


class DataSpec(Spec):
    """A text source: `heldout` documents set aside, the rest cut to `fraction` and then to `max_tokens`.

    All choices are deterministic in `seed`; what a document is: llmshrink.distill.data.
    """

    source: str = Field(
        "builtin:shakespeare",
        description="builtin:NAME, a datasets hub id, or a local .txt/.jsonl/.json/.parquet file",
    )
    config: str | None = Field(None, description="datasets config name, e.g. wikitext-103-raw-v1")
    split: str = "train"
    text_field: str = "text"
    template: Template | None = Field(
        None, description="make each record's document from its fields, e.g. "
        "'Summarize the dialogue.\\n{dialogue}\\nSummary: {summary}' (instead of text_field; not for .txt)",
    )
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    heldout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="fraction of documents held out of training, for evaluation during training",
    )
    streaming: bool = Field(
        False, description="read documents one by one and stop at max_tokens (needs max_tokens)",
    )


class TeacherSampling(Spec):
    """How recovery text is sampled from the teacher (the base model as loaded), in batches with a KV cache.

    Data-free distillation, as in LLM-QAT: the student learns the teacher's own distribution rather than a
    corpus's domain. Each sample starts with a prompt (the first `prompt_tokens` tokens of a document of
    `prompts`, left-padded) or, with no prompts, with the model's BOS token alone (so its first token is drawn
    from the model's own distribution), and ends at EOS or after `sample_tokens` new tokens.
    """

    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    prompts: DataSpec | None = Field(
        None, description="documents whose starts prompt the samples (builtin:NAME, a file or a hub id; a string "
        "is the source); none: start from BOS",
    )
    prompt_tokens: int = Field(16, ge=1, description="tokens of each prompt document kept as the prompt")
    sample_tokens: int = Field(128, ge=1, description="new tokens per sample at most (a sample also ends at EOS)")
    batch_size: int = Field(16, ge=1, description="samples generated together")
    seed: int = 0

    @field_validator("prompts", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value


class TeacherDataSpec(TeacherSampling):
    """`data: {source: teacher, tokens: N, ...}`: N tokens sampled from the teacher (see TeacherSampling)."""

    source: Literal["teacher"]
    tokens: int = Field(ge=1, description="how many tokens to sample in all (prompts included)")

    @property
    def heldout(self) -> float:
        return 0.0  # samples are drawn afresh; there is no document to hold out


class MixDataSpec(Spec):
    """`data: {source: mix, tokens: N, teacher_share: r, teacher: {...}, corpus: {...}}`: N - round(N·r) tokens
    of the corpus (its max_tokens is set to that), then round(N·r) tokens sampled from the teacher."""

    source: Literal["mix"]
    tokens: int = Field(ge=2, description="training tokens in all")
    teacher_share: float = Field(0.5, gt=0.0, lt=1.0, description="share of the tokens sampled from the teacher")
    teacher: TeacherSampling = TeacherSampling()
    corpus: DataSpec = DataSpec()

    @property
    def heldout(self) -> float:
        return self.corpus.heldout


# Pydantic names the branch of a tagged union in error paths; recipe.py leaves these names out.
CORPUS_TAG, TEACHER_TAG, MIX_TAG = "corpus text", "teacher samples", "teacher and corpus mix"
DATA_TAGS = {CORPUS_TAG: DataSpec, TEACHER_TAG: TeacherDataSpec, MIX_TAG: MixDataSpec}


def _data_kind(value: Any) -> str:
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    if source == "teacher":
        return TEACHER_TAG
    return MIX_TAG if source == "mix" else CORPUS_TAG  # a corpus, or a bad value its own checks then name


# The recipe's `data:` section: a text source, teacher samples, or a mix of both.
TrainingData = Annotated[
    Annotated[DataSpec, Tag(CORPUS_TAG)] | Annotated[TeacherDataSpec, Tag(TEACHER_TAG)]
    | Annotated[MixDataSpec, Tag(MIX_TAG)],
    Discriminator(_data_kind),
]
