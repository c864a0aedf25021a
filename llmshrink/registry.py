"""Pass name -> (config class, apply function). Unknown names get close-match suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing llmshrink.passes imports every pass, and each imports this module
    from llmshrink.passes.base import PassConfig


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type[PassConfig]
    apply: Callable  # apply(model, cfg, ctx) -> PassRecord


_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_cls: type[PassConfig], apply: Callable) -> None:
    if name in _PASSES and _PASSES[name].apply is not apply:
        raise ValueError(f"pass {name!r} is registered twice")
    _PASSES[name] = PassSpec(name, config_cls, apply)


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
    # Importing the package registers every built-in pass (each file calls register_pass).
    import llmshrink.passes  # noqa: F401
