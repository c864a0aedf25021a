"""What every pass shares: a frozen config model and a JSON-serialisable record; and, for the passes
that train (distill, local_distill), the training fields and how they become the trainer's arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from llmshrink.errors import LlmshrinkError

if TYPE_CHECKING:
    from llmshrink.context import Context

# A record is every decision a pass made, as plain JSON data (dicts, lists, numbers, strings).
PassRecord = dict[str, Any]


class PassConfig(BaseModel):
    """Base of all pass configs: unknown keys are errors, values cannot change after validation.

    Strict: `select_layers: true` or `rank: "2"` is an error, not 1 or 2 (an int is still a valid float).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
