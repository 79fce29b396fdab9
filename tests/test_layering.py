"""The import rules of DESIGN.md §1, held by walking the `ast` of every module in flags/,
edge/ and admin/: the pure core imports no framework, the planes never import each other,
and no module reads the environment on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flags", "stores", "edge", "admin")

# DESIGN.md §1 rule 1: the pure core may import these and nothing else (an allow-list, so a new
# dependency is a deliberate edit here, not an accident). Pure stdlib modules and small pure
# libraries only: no sockets, files, asyncio, redis, yaml or pydantic-settings.
CORE_ALLOWED = frozenset(
    {
        "__future__",
        "bisect",
        "collections",
        "dataclasses",
        "enum",
        "functools",
        "hashlib",
        "hmac",
        "itertools",
        "math",
        "operator",
        "re",
        "time",
        "typing",
        "unicodedata",
        "urllib",
        "mmh3",
        "orjson",
        "pydantic",
        "flags",
    }
)
# The other layers name what they may not import (rule 2).
FORBIDDEN: dict[str, frozenset[str]] = {
    "stores": frozenset({"edge", "admin", "turnout"}),
    # One HTTP server on the data plane (issue #9): no uvicorn, no Starlette on the edge.
    "edge": frozenset({"admin", "turnout", "uvicorn", "starlette"}),
    "admin": frozenset({"edge", "turnout"}),
}
REDIS_ALLOWED = frozenset({"stores/redisstore.py", "stores/ratesync.py"})
ENV_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def relname(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_roots(tree: ast.Module, package: str) -> set[str]:
    """Top-level package names a module imports: plain, dotted, relative (resolved to its own
    package) and dynamic (`importlib.import_module` / `__import__` with a literal name)."""
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(package if node.level else (node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def environment_reads(tree: ast.Module) -> list[str]:
    """Places a module touches the process environment directly (`os.environ`, `os.getenv`,
    `from os import environ`)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            names = [a.name for a in node.names if a.name in ENV_NAMES or a.name == "*"]
            found += [f"line {node.lineno}: from {node.module} import {n}" for n in names]
    return found


ALL = modules()
IDS = [relname(p) for p in ALL]


def test_packages_have_modules() -> None:
    """The walk finds modules in every layer (so the rules below are not vacuous)."""
    for package in PACKAGES:
        assert any(relname(p).startswith(f"{package}/") for p in ALL), package
    assert "stores/redisstore.py" in IDS


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_layer_imports(path: Path) -> None:
    """flags imports only its allow-list; stores, edge and admin skip the layers above them (and
    the edge skips uvicorn and Starlette); redis only in the Redis store."""
    name = relname(path)
    package = name.split("/")[0]
    roots = imported_roots(parse(path), package)
    if package == "flags":
        assert roots <= CORE_ALLOWED, f"{name} imports {sorted(roots - CORE_ALLOWED)}"
    else:
        bad = roots & FORBIDDEN[package]
        assert not bad, f"{name} imports {sorted(bad)}"
    if name not in REDIS_ALLOWED:
        assert "redis" not in roots, f"{name} imports redis (only the Redis store may)"


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_no_module_reads_the_environment(path: Path) -> None:
    """No module reads os.environ / os.getenv itself: settings are built once and passed down."""
    assert environment_reads(parse(path)) == [], relname(path)


def test_the_walkers_catch_violations() -> None:
    """The AST walkers see plain, dotted, relative and dynamic imports and environment reads."""
    tree = ast.parse(
        "import os\n"
        "import starlette.responses\n"
        "from admin.app import build\n"
        "from . import sibling\n"
        "import importlib\n"
        "importlib.import_module('redis.asyncio')\n"
        "from os import getenv\n"
        "token = os.environ.get('X')\n"
    )
    roots = imported_roots(tree, "flags")
    assert {"os", "starlette", "admin", "flags", "importlib", "redis"} <= roots
    found = environment_reads(tree)
    assert len(found) == 2
    assert "getenv" in found[0] + found[1] and "environ" in found[0] + found[1]


def test_an_edge_on_the_embedded_store_does_not_load_the_redis_client(tmp_path: Path) -> None:
    """The Redis client costs about 6 MiB of RSS per process (issue #9's memory budget): the
    modules a `turnout serve` on the file store runs, and its store, do not import it."""
    import subprocess
    import sys

    code = (
        "import sys, turnout.cli, turnout.server, turnout.edgeworker, admin.app\n"
        "from stores.settings import Settings\n"
        "from turnout.server import make_store\n"
        "make_store(Settings(state_dir=sys.argv[1]))\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "state")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
