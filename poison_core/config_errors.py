"""One-line messages for pydantic validation errors: `field.path: message (allowed: bounds; got value)`."""

from __future__ import annotations

from typing import Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ValidationError


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line: `field.path: message (allowed: bounds; got value)` [+ count of further errors]."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or model.__name__
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "bool_for_number":  # raised by the model, about one of its fields
        loc, msg = ".".join([*(str(p) for p in first["loc"]), first["ctx"]["field"]]), msg.split(": ", 1)[1]
    details = []
    bounds = _bounds_text(model, first["loc"])
    if bounds and first["type"] in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        details.append(f"allowed: {bounds}")
    if first["type"] not in {"missing", "value_error", "assertion_error", "bool_for_number"} and "input" in first:
        value = first["input"]
        if not isinstance(value, (dict, list)):
            details.append(f"got {value!r}")
    line = f"{loc}: {msg}" + (f" ({'; '.join(details)})" if details else "")
    if len(errors) > 1:
        line += f" [+{len(errors) - 1} more]"
    return line.replace("\n", " ")


def _bounds_text(model: type[BaseModel], loc: tuple) -> str:
    """Human bounds of the field at `loc`, read from its Field(ge/gt/le/lt) metadata."""
    current: Any = model
    info = None
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, str) and isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(part)
            if info is None:
                return ""
            current = info.annotation
        elif isinstance(part, int) and get_origin(current) in (tuple, list):
            current = get_args(current)[0]
        else:
            return ""
    if info is None:
        return ""
    name = str(loc[-1]) if isinstance(loc[-1], str) else str(loc[-2])
    lower = upper = ""
    for meta in info.metadata:
        if isinstance(meta, at.Ge):
            lower = f"{meta.ge} <= "
        elif isinstance(meta, at.Gt):
            lower = f"{meta.gt} < "
        elif isinstance(meta, at.Le):
            upper = f" <= {meta.le}"
        elif isinstance(meta, at.Lt):
            upper = f" < {meta.lt}"
    return f"{lower}{name}{upper}" if lower or upper else ""


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) is Union or str(get_origin(tp)) == "<class 'types.UnionType'>":
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
