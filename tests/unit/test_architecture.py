"""The import rules of ARCHITECTURE.md, checked on the source tree (AST, no imports run):

- backends/ is a leaf: nothing under it imports router/ (or loadtest/);
- router/ imports from backends/ only its faces: base (protocols), remote (the remote error
  family), factory (building engines, the remote sections' config types) and artifact (the
  prepared model folder's manifest, written by router/models/ and read by engines);
- no import cycle among non-generated modules (imports under `if TYPE_CHECKING:` excluded);
- configuration checks live in `validate()`: no `__post_init__` raises (one validation style;
  `__post_init__` only derives fields);
- no non-generated module past MAX_LINES, except the ones listed in OVERSIZED, which are due to
  be split; the list only shrinks (a listed module that has been split must leave the list).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("router", "backends", "loadtest")
BACKEND_FACES = {
    "backends",
    "backends.base",
    "backends.remote",
    "backends.factory",
    "backends.artifact",
    "backends.cpu",
}
MAX_LINES = 450
OVERSIZED: set[str] = set()
"""Modules over MAX_LINES today, each with the reason it is not split yet."""


def _generated(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return rel.startswith("router/proto/") or "_pb2" in path.name


@functools.cache
def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if _generated(path):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> Iterator[str]:
    """Absolute names of the modules the module imports, at any depth, except under
    TYPE_CHECKING. `from pkg import sub` imports the module pkg.sub when there is one (else a
    name defined in pkg)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    modules = _modules()

    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from walk(other)
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    yield sub if sub in modules else base
            yield from walk(child)

    yield from walk(tree)


def _edges() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target in _imports(name, path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_backends_import_nothing_from_router() -> None:
    bad = [
        f"{name} imports {target}"
        for name, path in _modules().items()
        if name.startswith("backends")
        for target in _imports(name, path)
        if target.split(".")[0] in ("router", "loadtest")
    ]
    assert not bad, bad


def test_router_imports_only_the_faces_of_backends() -> None:
    bad = [
        f"{name} imports {target}"
        for name, path in _modules().items()
        if name.startswith("router")
        for target in _imports(name, path)
        if target.split(".")[0] == "backends"
        and target not in BACKEND_FACES
        # `from backends.factory import X` also yields backends.factory.X: X is a name in it
        and target.rpartition(".")[0] not in BACKEND_FACES
    ]
    assert not bad, bad


def test_no_import_cycles() -> None:
    edges = _edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_modules_stay_small() -> None:
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in _modules().values()
    }
    over = {rel for rel, lines in sizes.items() if lines > MAX_LINES}
    assert over - OVERSIZED == set(), f"modules over {MAX_LINES} lines: split them"
    assert OVERSIZED - over == set(), "split already: remove these from OVERSIZED"


def test_the_rules_see_real_imports() -> None:
    """The checks above would pass vacuously if the walk found nothing."""
    edges = _edges()
    assert "backends.base" in edges["backends.factory"]
    assert "backends.remote" in edges["router.scheduler.remote_errors"]
    assert "router.errors" in edges["router.scheduler.engine"]


def test_validation_lives_in_validate() -> None:
    raising = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            post_init = isinstance(node, ast.FunctionDef) and node.name == "__post_init__"
            if post_init and any(isinstance(inner, ast.Raise) for inner in ast.walk(node)):
                raising.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert raising == [], f"move these checks into validate(): {raising}"
