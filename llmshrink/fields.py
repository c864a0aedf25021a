"""Field types that check a recipe value when the recipe is read, not when a pass first uses it.

Torch-free (recipe validation imports it). Each error is a PydanticCustomError, so recipe.py turns it into
the project's one line: `recipe.yaml: stages[0].kronecker.targets: not a valid regex (...), got '('`.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError


def check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise PydanticCustomError("regex", "not a valid regex ({error})", {"error": str(err)}) from None
    return pattern


Regex = Annotated[str, AfterValidator(check_regex)]

# Targeting fields that pass configs share word for word (the config gives the default).
BlockLayers = Annotated[Regex, Field(description="regex over full module names (Linear or Conv1D); default: every "
                                                 "block layer")]
BLOCK_LAYERS = r".*\.\d+\..*"  # BlockLayers' default: every layer inside the numbered blocks
Exclude = Annotated[Regex | None, Field(description="regex (full match) of module names to leave as they are")]
BlockIndices = Annotated[list[int] | None, Field(description="only these block indices")]

_TEMPLATE_ALLOWED = "allowed: named record fields like {dialogue}, and {{ or }} for a literal brace"


def check_template(template: str) -> str:
    """Only `{name}` fields: the template is filled with str.format_map(record), so a positional field
    ({} or {0}) could never be filled, and a stray brace fails only when the first record is read."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise PydanticCustomError(
            "template", "unbalanced braces ({error}); {allowed}", {"error": str(err), "allowed": _TEMPLATE_ALLOWED}
        ) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise PydanticCustomError(
                "template", "{field} is not a named field; {allowed}", {"field": field, "allowed": _TEMPLATE_ALLOWED}
            )
    return template


Template = Annotated[str, AfterValidator(check_template)]


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# Strict mode takes only a real tuple for a tuple field; YAML has lists, so a list becomes a tuple first
# (its items are still checked strictly).
AsTuple = BeforeValidator(_list_to_tuple)


def first_repeat(names: list[str]) -> tuple[int, int] | None:
    """(index, index of its first occurrence) of the first name that occurs twice, or None: for the
    `duplicate_name` errors of named lists, which describe_error places at the later item's name."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            return index, seen[name]
        seen[name] = index
    return None
