"""The one YAML loader: settings files, seed files and `turnout apply` all read through it.

Rules of this file (issue #13):
* YAML 1.2 core schema (ruamel.yaml, pure-Python mode): `off`, `on`, `yes`, `no` are strings,
  as a person who writes `stage: off` means. PyYAML implements YAML 1.1, where they are
  booleans, so the README's own `stages: {off: 0}` became `{False: 0}`.
* A duplicate key anywhere is refused with its line: the last one silently winning is how a
  second `web:` entry once became 100 % canary.
* The result is plain JSON data: mappings with string keys, lists, strings, numbers, booleans
  and null. A date-like scalar (`2026-01-01`) stays the string it was written as; binary,
  sets and other tags are refused, naming the dotted path.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

MAX_YAML_BYTES = 4 * 1024 * 1024  # the document's own cap (flags.document.MAX_DOCUMENT_BYTES)


class YamlError(ValueError):
    """A file that is not valid YAML (or not plain data); the message names file and line."""


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.allow_duplicate_keys = False
    return yaml


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _describe(exc: YAMLError, source: str) -> str:
    if isinstance(exc, DuplicateKeyError):
        problem = str(exc.problem or "duplicate key").split(" with value")[0]
        problem = problem.removeprefix("found ")
        first = (
            f" (in the mapping that starts at line {exc.context_mark.line + 1})"
            if exc.context_mark
            else ""
        )
        return f"{source}: {_line(exc.problem_mark)}: {problem}{first}"
    if isinstance(exc, MarkedYAMLError):
        where = _line(exc.problem_mark or exc.context_mark)
        problem = exc.problem or exc.context or "invalid YAML"
        return f"{source}: {where}: {problem}"
    return f"{source}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _plain(value: Any, path: str, source: str) -> Any:
    """`value` as JSON data, or `YamlError` naming the path of what JSON cannot hold."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if isinstance(key, (bool, int, float)) or key is None:
                    key = "null" if key is None else str(key).lower()
                else:
                    raise YamlError(f"{source}: {path or 'top level'}: keys must be strings")
            out[key] = _plain(item, f"{path}.{key}" if path else key, source)
        return out
    if isinstance(value, list):
        return [
            _plain(item, f"{path}.{i}" if path else str(i), source) for i, item in enumerate(value)
        ]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    kind = type(value).__name__
    raise YamlError(f"{source}: {path or 'top level'}: a {kind} value is not allowed here")


def load_yaml(text: str, source: str = "<input>") -> Any:
    """Parse one YAML (or JSON) document into plain data; `YamlError` with file and line."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(f"{source}: larger than {MAX_YAML_BYTES} bytes")
    try:
        data = _yaml().load(text)
    except YAMLError as exc:
        raise YamlError(_describe(exc, source)) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. an unhashable key
        raise YamlError(f"{source}: invalid YAML: {exc}") from None
    return _plain(data, "", source)


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file; `YamlError` naming the file for any failure."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise YamlError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise YamlError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise YamlError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_yaml(text, str(path))


def read_mapping_file(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold one mapping (`what` names it in the error)."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise YamlError(f"{path}: must hold a mapping ({what}), found {found}")
    return data
