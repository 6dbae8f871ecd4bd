"""Dependencies flow one way (storage <- assistant <- personalize; each package docstring says what it owns).
Read every module's imports with ``ast``, function-local ones included (``if TYPE_CHECKING:`` blocks
excluded: they never run), and check that

- ``storage/`` imports no model, UI or training code (assistant, personalize, gradio, torch, faiss, ...);
- ``assistant/`` never imports ``personalize/`` (``launch.py`` composes the two and hands serving a job runner);
- no two modules import each other, directly or round a longer circle.

Known violations in files another engineer owns are listed in ``ALLOWED``, each with why; the test fails on
any NEW violation, and also on an allowlisted one that is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "assistant", "personalize", "bench")
TOP_LEVEL = ("launch",)
STORAGE_MUST_NOT = ("assistant", "personalize", "bench", "launch", "gradio", "torch", "faiss", "transformers",
                    "peft", "trl", "bitsandbytes", "sentence_transformers", "fastapi", "uvicorn")

ALLOWED: set[tuple[str, str]] = set()
"""(importer, imported) edges that break a rule today (none left); add one only with its reason and fix."""

CYCLE_EDGES: set[tuple[str, str]] = set()
"""(importer, imported) edges that close an import circle today (none left); the circle check ignores them."""


def _modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in TOP_LEVEL}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """Every module ``module`` imports at run time (any depth; a name imported from a package counts as
    the submodule when there is one)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".")[: len(module.split(".")) - child.level]
                    base = ".".join([*pkg, base] if base else pkg)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in known else base)
            stack.append(child)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(ast.parse(path.read_text(), str(path)), name, known) for name, path in modules.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _rule_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for module, imports in graph.items():
        for imported in imports:
            if _top(module) == "storage" and _top(imported) in STORAGE_MUST_NOT:
                bad.add((module, imported))
            if _top(module) == "assistant" and _top(imported) == "personalize":
                bad.add((module, imported))
    return bad


def _cycles(graph: dict[str, set[str]], ignore: set[tuple[str, str]] = frozenset()) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), among first-party modules, without
    the ``ignore`` edges."""
    edges = {m: {i for i in imports if i in graph and i != m and (m, i) not in ignore} for m, imports in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_reader_sees_function_local_imports_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from storage.db import Store\n"
                     "def f():\n    import torch\n    from storage import paths\n")
    assert _imported(tree, "storage.x", {"storage.paths"}) == {"typing", "torch", "storage.paths"}


def test_storage_and_assistant_import_only_downward():
    new = _rule_violations(_graph()) - ALLOWED
    assert not new, "imports that break the one-way rule (see tests/test_imports.py): " + ", ".join(
        f"{a} -> {b}" for a, b in sorted(new))


def test_no_import_cycles():
    new = _cycles(_graph(), CYCLE_EDGES)
    assert not new, "import circles (use storage.common, or a TYPE_CHECKING-only import): " + "; ".join(
        " <-> ".join(sorted(c)) for c in new)


def test_the_allowlists_only_shrink():
    graph = _graph()
    gone = (ALLOWED - _rule_violations(graph)) | {(a, b) for a, b in CYCLE_EDGES if b not in graph.get(a, ())}
    assert not gone, f"fixed, remove from the allowlists in tests/test_imports.py: {sorted(gone)}"


def test_the_cycle_check_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "os"}, "d": {"a"}}
    assert _cycles(graph) == {frozenset({"a", "b", "c"})} and _cycles(graph, {("c", "a")}) == set()
