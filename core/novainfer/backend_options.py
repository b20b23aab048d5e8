"""A backend's options: the arm's `backend_options` table parsed into the type its plugin declares
(`BackendSpec.options`), with one-line errors that name the option and its valid values.

An option type is a dataclass whose fields each have a default and one of the types a TOML value can have:
bool, int, float, str, a Literal of such values, or a union of them. Checked strictly, as the experiment file
is: 1 is not true, "16" is not 16 (an int is a float, as TOML writes 2.0 as 2 and means it).
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from novainfer.backend_api import BackendError

# Plain option types, and how an error message says what they accept.
_PLAIN = {bool: "true, false", int: "an integer", float: "a number", str: "a string"}


def _alternatives(annotation: Any) -> list[Any]:
    """The members of a union (flattened), or the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _alternatives(arg)]
    return [annotation]


def _is_literal(annotation: Any) -> bool:
    return get_origin(annotation) is Literal


def _accepts(annotation: Any, value: Any) -> bool:
    for member in _alternatives(annotation):
        # type() rather than isinstance: True is an int to Python, never to an option.
        if _is_literal(member) and any(type(value) is type(v) and value == v for v in get_args(member)):
            return True
        if member is float and type(value) in (int, float):
            return True
        if member in _PLAIN and type(value) is member:
            return True
    return False


def _expected(annotation: Any) -> str:
    """What an option accepts, in words: "one of auto, triton, torch", 'true, false or "auto"'."""
    members = _alternatives(annotation)
    if all(_is_literal(m) for m in members):
        values = dict.fromkeys(str(v) for m in members for v in get_args(m))
        return f"one of {', '.join(values)}"
    parts: list[str] = []
    for member in members:
        if _is_literal(member):
            parts += [json.dumps(v) for v in get_args(member)]
        else:
            parts += _PLAIN[member].split(", ")
    return f"{', '.join(parts[:-1])} or {parts[-1]}" if len(parts) > 1 else parts[0]


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a valid option type (one line), or None. Asked once, when the backend registers."""
    if not (isinstance(schema, type) and is_dataclass(schema)):
        return f"options must be a dataclass type, got {schema!r}"
    hints = get_type_hints(schema)
    for f in fields(schema):
        if f.default is MISSING and f.default_factory is MISSING:
            return f"option {f.name} has no default"
        members = _alternatives(hints[f.name])
        if not all(_is_literal(m) or m in _PLAIN for m in members):
            return f"option {f.name}: {hints[f.name]} is not bool, int, float, str, a Literal or a union of them"
        default = f.default if f.default is not MISSING else f.default_factory()
        if not _accepts(hints[f.name], default):
            return f"option {f.name}: its default {default!r} is not {_expected(hints[f.name])}"
    return None


def parse_options(backend: str, schema: type, raw: Any) -> Any:
    """`raw` (the arm's table) as an instance of `schema`; an instance of it already is one. Raises
    BackendError, one line that starts with the backend's name: "native: kernels must be one of auto,
    triton, torch, got 'cuda'"."""
    if isinstance(raw, schema):
        return raw
    if not isinstance(raw, Mapping):
        raise BackendError(f"{backend}: backend_options must be a table of option names to values, got {raw!r}")
    known = [f.name for f in fields(schema)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise BackendError(
            f"{backend}: unknown backend option(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}"
        )
    hints = get_type_hints(schema)
    for name, value in raw.items():
        if not _accepts(hints[name], value):
            raise BackendError(f"{backend}: {name} must be {_expected(hints[name])}, got {value!r}")
    try:
        return schema(**raw)
    except ValueError as error:  # a rule of the plugin's own (__post_init__)
        raise BackendError(f"{backend}: {' '.join(str(error).split())}") from None


def describe_options(schema: type) -> str:
    """The options as `nova-ab backends` lists them: "kernels: one of auto, triton, torch"; "" for none."""
    hints = get_type_hints(schema)
    return "; ".join(f"{f.name}: {_expected(hints[f.name])}" for f in fields(schema))
