"""Typed recipe sections: every YAML section is parsed into a pydantic model before any work.

pydantic (a dependency of transformers' and lm-eval's stack already) does the typing: values are
coerced where that is unambiguous (`group_size: "64"` is 64; `learning_rate: 2e-4`, which YAML
1.1 reads as the string "2e-4", is 0.0002), unknown keys are refused, and anything else is one
`RecipeError` line that names the key, what was expected and what was given.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qtool.errors import QtoolError


class RecipeError(QtoolError):
    """A recipe that cannot be read or whose values have the wrong type or range."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


S = TypeVar("S", bound=BaseModel)


def parse_section(cls: type[S], data: Any, where: str, names: dict[str, str] | None = None,
                  error: type[QtoolError] = RecipeError) -> S:
    """`data` (a YAML mapping) as a `cls`; raises `error` (RecipeError) with one line naming the key.

    `names` renames key paths in the message (e.g. "max_tokens" -> "--max-tokens" for flags).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise error(describe_error(exc, cls, where, names or {})) from None


def describe_error(exc: ValidationError, cls: type[BaseModel], where: str, names: dict[str, str] | None = None) -> str:
    """The first validation error as one line: `where: key.path: what is wrong (got VALUE)`."""
    error = exc.errors(include_url=False)[0]
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith(("function-", "union[")))]
    path = ".".join(str(part) for part in loc)
    path = (names or {}).get(path, path)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(cls, loc[:-1]))
        return f"{where}: unknown key {path!r}; allowed here: {allowed}"
    if kind == "missing":
        return f"{where}: missing {path!r}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    shown = f" (got {given!r})" if not isinstance(given, (dict, list)) else ""
    return f"{where}: {path}: {message}{shown}" if path else f"{where}: {message}"


def _fields_at(cls: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names of the model found by following `loc` from `cls` (lists and optionals unwrapped)."""
    model: Any = cls
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        model = _model_in(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
