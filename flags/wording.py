"""Validation errors in plain words: pydantic's error types mapped to Turnout's own wording.

Rules of this file (issue #13):
* One function, `describe_error`, turns any pydantic error (of the document, a part of it, or
  the settings) into `(field, message)`: the dotted field path and a sentence a person can act
  on, with the value that was given. It works from the error's `type` and `ctx`, never from
  pydantic's English (`Input should be ...`, `Tuple should have ...`) or its documentation URLs,
  so a field added tomorrow gets the same wording without an edit here.
* An error type not in the table still gets a plain sentence ("is not valid"), never the
  library's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_SHOWN_CHARS = 60


def _count(n: Any, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _plural_items(ctx: Mapping[str, Any], key: str) -> str:
    return _count(ctx.get(key, "?"), "item", "items")


def _chars(ctx: Mapping[str, Any], key: str) -> str:
    return _count(ctx.get(key, "?"), "character", "characters")


def _choices(ctx: Mapping[str, Any]) -> str:
    expected = str(ctx.get("expected", ""))
    return expected.replace("'", "").replace(" or ", ", ")


_WORDING: dict[str, Any] = {
    "missing": lambda ctx: "is required",
    "extra_forbidden": lambda ctx: "unknown field",
    "string_type": lambda ctx: "must be text (a string)",
    "string_unicode": lambda ctx: "must be valid text",
    "string_too_short": lambda ctx: f"must be at least {_chars(ctx, 'min_length')} long",
    "string_too_long": lambda ctx: f"must be at most {_chars(ctx, 'max_length')} long",
    "string_pattern_mismatch": lambda ctx: "does not have the required form",
    "int_type": lambda ctx: "must be a whole number",
    "int_parsing": lambda ctx: "must be a whole number",
    "int_from_float": lambda ctx: "must be a whole number, without a fraction",
    "int_parsing_size": lambda ctx: "is too large a number",
    "float_type": lambda ctx: "must be a number",
    "float_parsing": lambda ctx: "must be a number",
    "finite_number": lambda ctx: "must be a finite number",
    "bool_type": lambda ctx: "must be true or false",
    "bool_parsing": lambda ctx: "must be true or false",
    "dict_type": lambda ctx: "must be a mapping (key: value pairs)",
    "model_type": lambda ctx: "must be a mapping (key: value pairs)",
    "model_attributes_type": lambda ctx: "must be a mapping (key: value pairs)",
    "list_type": lambda ctx: "must be a list",
    "tuple_type": lambda ctx: "must be a list",
    "set_type": lambda ctx: "must be a list",
    "iterable_type": lambda ctx: "must be a list",
    "too_short": lambda ctx: f"must have at least {_plural_items(ctx, 'min_length')}",
    "too_long": lambda ctx: f"must have at most {_plural_items(ctx, 'max_length')}",
    "greater_than": lambda ctx: f"must be greater than {ctx.get('gt')}",
    "greater_than_equal": lambda ctx: f"must be {ctx.get('ge')} or more",
    "less_than": lambda ctx: f"must be less than {ctx.get('lt')}",
    "less_than_equal": lambda ctx: f"must be {ctx.get('le')} or less",
    "multiple_of": lambda ctx: f"must be a multiple of {ctx.get('multiple_of')}",
    "literal_error": lambda ctx: f"must be one of: {_choices(ctx)}",
    "enum": lambda ctx: f"must be one of: {_choices(ctx)}",
    "json_invalid": lambda ctx: "is not valid JSON",
    "json_type": lambda ctx: "must be JSON text",
    "none_required": lambda ctx: "must be empty (null)",
    "frozen_instance": lambda ctx: "cannot be changed",
    "url_parsing": lambda ctx: "is not a valid URL",
    "url_scheme": lambda ctx: f"must be a URL with scheme {_choices(ctx)}",
}


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """The dotted path of an error's location (`releases.web.stable.0`)."""
    # Every part is kept, even one that looks like a type name: it may be a release or stage
    # the user named "int" (the models use nullable fields, not unions, so pydantic adds no
    # union-member tags to these paths).
    parts = [str(part) for part in loc]
    if prefix:
        parts.insert(0, prefix)
    return ".".join(parts)


def shown_value(value: Any) -> str:
    """A short rendering of a given value for a message, or "" when it says nothing."""
    if isinstance(value, (Mapping, list, tuple)):
        if not value:
            return "none" if isinstance(value, (list, tuple)) else "an empty mapping"
        return f"a {'mapping' if isinstance(value, Mapping) else 'list'}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def describe_error(error: Mapping[str, Any], prefix: str = "") -> tuple[str, str]:
    """One pydantic error (an item of `ValidationError.errors()`) as (field, message)."""
    kind = str(error.get("type", ""))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    field = field_path(tuple(error.get("loc", ())), prefix)
    if kind in ("value_error", "assertion_error"):
        # Our own validators' text: the exception message without pydantic's prefix.
        cause = ctx.get("error")
        message = str(cause) if cause is not None else "is not valid"
    else:
        wording = _WORDING.get(kind)
        message = wording(ctx) if wording is not None else "is not valid"
    # A whole-model check (no field) is about several fields: showing the input would print
    # the whole mapping.
    if field and kind not in ("missing", "extra_forbidden") and "input" in error:
        shown = shown_value(error["input"])
        if shown:
            message = f"{message}, got {shown}"
    return field, message
