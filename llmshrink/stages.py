"""A recipe stage, `{pass name: config}`, validated by its pass's config model; and a pydantic error as the
project's one-line message. Torch-free, and below the pass configs: the recipe parses its stages here, and so
does iterate (its config when the recipe is read, its pass when it runs) for its inner stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from llmshrink.errors import RecipeError
from llmshrink.passes.base import PassConfig
from llmshrink.registry import get_pass
from llmshrink.specs import DATA_TAGS


@dataclass(frozen=True)
class Stage:
    name: str
    config: PassConfig


def parse_stage(item: Any, file: str, field: str) -> Stage:
    """One `{pass name: config}` item, validated by the pass's config model; `field` names it in errors.

    The config is validated with context {"file", "field"}, so a pass holding stages of its own
    (iterate) reports a nested mistake under its full path.
    """
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(file, field, f"expected a one-key mapping {{pass name: config}}, got {item!r}")
    (name, body), = item.items()
    try:
        spec = get_pass(str(name))
    except KeyError as err:
        raise RecipeError(file, field, err.args[0]) from None
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise RecipeError(file, f"{field}.{name}", f"expected a mapping of settings, got {body!r}")
    try:
        config = spec.config_cls.model_validate(body, context={"file": file, "field": f"{field}.{name}"})
        return Stage(name, config)
    except ValidationError as err:
        raise RecipeError(file, *describe_error(err, spec.config_cls, prefix=f"{field}.{name}")) from None


def describe_error(
    err: ValidationError, model: type[BaseModel], prefix: str, branches: tuple[str, ...] = ()
) -> tuple[str, str]:
    """(field path, message) for the first pydantic error, in the project's one-line style. `branches`: the
    names pydantic gives a tagged union's branches in error paths, left out of the field path."""
    first = err.errors()[0]
    loc = [part for part in first["loc"] if part not in branches]
    tagged, loc = loc, [part for part in loc if part not in DATA_TAGS]
    field = prefix
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    value = first.get("input")
    if first["type"] == "duplicate_name":
        return f"{field}[{first['ctx']['index']}].name", first["msg"]
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, tagged[:-1])
        return field, f"unknown key; allowed: {', '.join(allowed)}" if allowed else "unknown key"
    if first["type"] == "missing":
        return field, "required field is missing"
    message = first["msg"]
    message = message[0].lower() + message[1:] if message else message
    return field, f"{message}, got {value!r}"


def _allowed_keys(model: type[BaseModel], loc: list) -> list[str]:
    # Walk the pydantic models along the error's path to list the keys valid at that level.
    for part in loc:
        if part in DATA_TAGS:  # the branch of the `data:` union that failed
            model = DATA_TAGS[part]
            continue
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(part)
        model = _model_of(info.annotation) if info else None
    return list(model.model_fields) if model is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
