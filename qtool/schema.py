"""Typed recipe sections: every YAML section is parsed into a pydantic model before any work.

pydantic (a dependency of transformers' and lm-eval's stack already) does the typing: values are
coerced where that is unambiguous (`group_size: "64"` is 64; `learning_rate: 2e-4`, which YAML
1.1 reads as the string "2e-4", is 0.0002), unknown keys are refused, and anything else is one
`RecipeError` line that names the key, what was expected and what was given.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qtool.errors import QtoolError


class RecipeError(QtoolError):
    """A recipe that cannot be read or whose values have the wrong type or range."""


MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors; assignments are validated too.

    A YAML boolean is not a number here (pydantic would read `bits: true` as 1): a numeric field
    given true/false is an error that names the key.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                values = value if isinstance(value, list) else [value]
                if field and any(isinstance(v, bool) for v in values) and _numeric_only(field.annotation):
                    raise ValueError(f"{key}: expected a number, got {str(value).lower()}")
        return data


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
    """The first validation error as one line: `where: key.path: what is wrong (got VALUE)` (an empty
    `where` is left out: the CLI's own errors need no prefix after "qtool: error:")."""
    error = exc.errors(include_url=False)[0]
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith(("function-", "union[")))]
    path = ".".join(str(part) for part in loc)
    path = (names or {}).get(path, path)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(cls, loc[:-1]))
        return _joined(where, f"unknown key {path!r}; allowed here: {allowed}")
    if kind == "missing":
        return _joined(where, f"missing {path!r}")
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    shown = f" (got {given!r})" if not isinstance(given, (dict, list)) else ""
    return _joined(where, path, f"{message}{shown}" if path else message)


def _joined(*parts: str) -> str:
    return ": ".join(part for part in parts if part)


def _numeric_only(annotation: Any) -> bool:
    """True when the annotation admits int or float (possibly in a list or optional) but not bool."""
    kinds: set[Any] = set()

    def walk(a: Any) -> None:
        origin = typing.get_origin(a)
        if origin is typing.Annotated:
            walk(typing.get_args(a)[0])
        elif origin in (typing.Union, types.UnionType, list):
            for arg in typing.get_args(a):
                walk(arg)
        else:
            kinds.add(a)

    walk(annotation)
    return bool(kinds & {int, float}) and bool not in kinds


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
