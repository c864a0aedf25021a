"""Pass name -> (config class, implementation module). Unknown names get close-match suggestions.

A pass is registered by its config class (torch-free, llmshrink/passes/configs/NAME.py); its implementation
module, which imports torch and maybe peft or bitsandbytes, is imported only when the pass runs. So
validating a recipe stays fast and quiet. The same goes for a pass's lifecycle hooks (passes/base.py): they
are functions of the implementation module, looked up there when the engine calls them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the configs import this module to register themselves
    from torch import nn

    from llmshrink.context import Context
    from llmshrink.passes.base import PassConfig, PassHooks, PassRecord


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type[PassConfig]
    module: str  # the implementation: a module with apply(model, cfg, ctx) -> PassRecord, and maybe hooks

    def apply(self, model: nn.Module, cfg: PassConfig, ctx: Context) -> PassRecord:
        """Run the pass (noting that it ran, for passes_run). The implementation's apply is looked up on every
        call, so a test's monkeypatch of it is seen."""
        ran = _RAN.get()
        if ran is not None and self not in ran:
            ran.append(self)
        return importlib.import_module(self.module).apply(model, cfg, ctx)

    @property
    def hooks(self) -> PassHooks:
        """The lifecycle hooks the implementation defines (imports it; looked up on every access, as apply)."""
        from llmshrink.passes.base import PassHooks

        implementation = importlib.import_module(self.module)
        return PassHooks(**{f.name: getattr(implementation, f.name, None) for f in fields(PassHooks)})


_PASSES: dict[str, PassSpec] = {}
# While passes_run() is open: each pass whose apply was called, in the order they first ran.
_RAN: ContextVar[list[PassSpec] | None] = ContextVar("llmshrink_passes_run", default=None)


@contextmanager
def passes_run() -> Iterator[list[PassSpec]]:
    """Collects the passes that run inside the block, once each, in the order they first run; also those that
    a pass runs itself through get_pass (iterate's inner stages). The engine calls their hooks afterwards."""
    ran: list[PassSpec] = []
    token = _RAN.set(ran)
    try:
        yield ran
    finally:
        _RAN.reset(token)


def register_pass(name: str, module: str | None = None) -> Callable[[type[PassConfig]], type[PassConfig]]:
    """Class decorator: `name` runs `module`.apply (default llmshrink.passes.NAME) with this config class."""

    def register(config_cls: type[PassConfig]) -> type[PassConfig]:
        spec = PassSpec(name, config_cls, module or f"llmshrink.passes.{name}")
        old = _PASSES.get(name)
        if old is not None and (old.module, old.config_cls.__qualname__) != (spec.module, config_cls.__qualname__):
            raise ValueError(f"pass {name!r} is registered twice")
        _PASSES[name] = spec
        return config_cls

    return register


def pass_names() -> list[str]:
    _load_builtin_passes()
    return sorted(_PASSES)


def get_pass(name: str) -> PassSpec:
    """The pass called `name`; KeyError with a 'did you mean' message otherwise."""
    _load_builtin_passes()
    if name in _PASSES:
        return _PASSES[name]
    close = difflib.get_close_matches(name, list(_PASSES), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise KeyError(f"unknown pass {name!r}; {hint}known passes: {', '.join(sorted(_PASSES))}")


def _load_builtin_passes() -> None:
    import llmshrink.passes.configs  # noqa: F401  (each config file registers its pass)
