"""No booleans where a number is meant: YAML's ``true`` is not the integer 1.

Pydantic's lax mode turns ``True`` into ``1`` for an int field and ``1.0`` for a float field, so
``seeds: [true]`` or ``epochs: true`` would run as 1. Full strict mode would also refuse YAML lists for
tuple fields, so instead every config base model runs :func:`refuse_bools` before validation: a bool
given where the field's annotation allows a number but not a bool is refused, naming the field.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

BOOL_FOR_NUMBER = "bool_for_number"


def _allows(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether `annotation` (through Optional, Union, Annotated) admits one of `kinds` at its top level."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _allows(get_args(annotation)[0], kinds)
    if origin is Union or origin is types.UnionType:
        return any(_allows(arg, kinds) for arg in get_args(annotation))
    if origin is Literal:
        return any(isinstance(v, kinds) for v in get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, kinds)


def _elements(annotation: Any) -> Any | None:
    """The element annotation of tuple[X, ...] / list[X] / set[X] (through Optional), else None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _elements(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        found = [e for e in (_elements(a) for a in get_args(annotation)) if e is not None]
        return found[0] if found else None
    if origin in (tuple, list, set, frozenset):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return args[0] if len(set(map(repr, args))) == 1 else None
    return None


def _numeric_not_bool(annotation: Any) -> bool:
    return _allows(annotation, (int, float)) and not _allows(annotation, (bool,))


def refuse_bools(model: type[BaseModel], data: Any) -> Any:
    """`data` unchanged, or a ``bool_for_number`` error naming the first field given a bool where a number
    is meant (config_errors joins the field to the model's location)."""
    if not isinstance(data, dict):
        return data
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in data:
            continue
        value, annotation = data[key], field.annotation
        if isinstance(value, bool) and _numeric_not_bool(annotation):
            raise PydanticCustomError(BOOL_FOR_NUMBER, "{field}: {value} is a boolean; a number is expected here",
                                      {"field": key, "value": str(value).lower()})
        element = _elements(annotation)
        if isinstance(value, (list, tuple)) and element is not None and _numeric_not_bool(element):
            bad = [v for v in value if isinstance(v, bool)]
            if bad:
                raise PydanticCustomError(BOOL_FOR_NUMBER, "{field}: {value} is a boolean; numbers are expected here",
                                          {"field": key, "value": str(bad[0]).lower()})
    return data
