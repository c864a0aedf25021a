"""What every pass shares: a frozen config model and a JSON-serialisable record; the optional lifecycle hooks
a pass may give the engine (after the stages, and around the checkpoint); and, for the passes that train
(distill, local_distill), the training fields and how they become the trainer's arguments."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from llmshrink.errors import LlmshrinkError

if TYPE_CHECKING:  # this module stays torch-free: the configs import it, and `validate` reads only them
    from pathlib import Path

    from torch import nn

    from llmshrink.context import Context

# Fields renamed for one vocabulary across passes: {old name: new name}.
RENAMED_FIELDS = {"selection_tokens": "calibration_tokens"}

# A record is every decision a pass made, as plain JSON data (dicts, lists, numbers, strings).
PassRecord = dict[str, Any]


# --- lifecycle hooks ---------------------------------------------------------------------------------------
#
# A pass is its implementation module, llmshrink/passes/NAME.py, with apply(model, cfg, ctx) -> PassRecord.
# The module may also define any of the functions below, under these names; the engine reaches them through
# the registry (PassSpec.hooks), only for the passes that ran, so an implementation is still imported only
# when its pass runs. Every hook is called once per pass, however many stages (or iterate groups) ran it.
#
#   after the last stage, on every process, in the order the passes first ran:
#       finalize(model, ctx) -> str | None
#   saving (main process), in reverse order, so that what was added last comes off first:
#       save_extra(model, directory) -> Extra | None, then, if it returned an Extra, unload_extra(model)
#   the reload check (main process), in the order the passes ran, onto the reloaded checkpoint:
#       load_extra(model, directory) -> model
#
# save_extra, unload_extra and load_extra come together (a pass defines all three or none).


class Finalize(Protocol):
    def __call__(self, model: nn.Module, ctx: Context) -> str | None:
        """Settle what the pass left on `model` to be settled after every stage ran (LoRA folds its adapters into
        the weights here, so that a later distill stage trained them first); runs before the evaluation.

        `ctx` is the run's context, with no stage folder (work_dir is None). Returns a one-line summary, which
        the engine logs indented under the last stage, or None when there was nothing to do.
        """


@dataclass(frozen=True)
class Extra:
    """What save_extra kept apart from the checkpoint: a folder beside it in the output, named in llmshrink.json."""

    name: str  # the folder's name inside the output, and the manifest's key for `manifest`
    manifest: dict[str, Any] = field(default_factory=dict)  # JSON data
    # The reload check: the reloaded checkpoint with load_extra must give the logits the model had before
    # unload_extra to within atol (0: exactly); the manifest's checks record the difference as
    # "<name>_reload_max_abs_logit_diff". Another code path may sum in another order, hence a tolerance.
    atol: float = 0.0


class SaveExtra(Protocol):
    def __call__(self, model: nn.Module, directory: Path) -> Extra | None:
        """Write what the pass added to `model` that the checkpoint does not hold (unmerged LoRA adapters) into
        `directory`, which does not exist yet; `model` must not change. Returns None, creating nothing, when
        there is nothing to keep.

        Runs on the main process after the evaluation, before the checkpoint is written; the engine then moves
        `directory` to <output>/<Extra.name> and stores Extra.manifest under that key of llmshrink.json.
        """


class UnloadExtra(Protocol):
    def __call__(self, model: nn.Module) -> None:
        """Take off `model` what save_extra wrote, in place, so that the checkpoint holds the model without it.
        Called only after save_extra returned an Extra, and after the engine took the logits for the check."""


class LoadExtra(Protocol):
    def __call__(self, model: nn.Module, directory: Path) -> nn.Module:
        """Put back onto `model` (the checkpoint as reloaded, with the extras of earlier passes already back)
        what save_extra wrote in `directory` (the folder inside the output being published); returns the model
        to run, which may wrap `model` (as PeftModel.from_pretrained does). For the reload check only."""


@dataclass(frozen=True)
class PassHooks:
    """The lifecycle hooks an implementation module defines; None for those it does not."""

    finalize: Finalize | None = None
    save_extra: SaveExtra | None = None
    unload_extra: UnloadExtra | None = None
    load_extra: LoadExtra | None = None

    def __post_init__(self) -> None:
        extras = [self.save_extra, self.unload_extra, self.load_extra]
        if any(hook is not None for hook in extras) and any(hook is None for hook in extras):
            raise TypeError("a pass defines save_extra, unload_extra and load_extra together, or none of them")


class PassConfig(BaseModel):
    """Base of all pass configs: unknown keys are errors, values cannot change after validation.

    Strict: `select_layers: true` or `rank: "2"` is an error, not 1 or 2 (an int is still a valid float).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        """Old recipes keep working: a renamed field's old name is read as the new one, with a warning."""
        if not isinstance(data, dict):
            return data
        for old, new in RENAMED_FIELDS.items():
            if old in data and new in cls.model_fields:
                if new in data:
                    raise PydanticCustomError("renamed", "{old} is the old name of {new}; set only {new}",
                                              {"old": old, "new": new})
                warnings.warn(f"{old} is deprecated, it is now called {new}", FutureWarning, stacklevel=2)
                data = {(new if key == old else key): value for key, value in data.items()}
        return data


class TrainingConfig(PassConfig):
    """Optimisation settings of a pass that trains; subclasses may change the defaults."""

    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="blocks per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=2, description="tokens per block")
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine decay to zero")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 = off")
    save_every: int = Field(
        0, ge=0, description="save the training state every N steps; rerunning the command resumes (0 = off)"
    )

    def trainer_options(self, pass_name: str, ctx: Context) -> dict[str, Any]:
        """Keyword arguments of distill.trainer.train that come from these fields and the run's context."""
        if self.save_every and ctx.work_dir is None:
            raise LlmshrinkError(f"{pass_name}.save_every: needs a work directory; run it through `llmshrink apply`")
        return {
            "steps": self.steps, "lr": self.lr, "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "max_grad_norm": self.max_grad_norm, "seed": ctx.seed, "device": ctx.device, "log": ctx.log,
            "state_dir": ctx.work_dir if self.save_every else None, "save_every": self.save_every,
        }
