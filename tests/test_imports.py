"""Dependencies flow one way (storage <- assistant <- personalize; each package docstring says what it owns).
Read every module's imports with ``ast``, function-local and type-only (``if TYPE_CHECKING:``) ones included,
and check that

- ``storage/`` imports no model, UI or training code (assistant, personalize, gradio, torch, faiss, ...);
- ``assistant/`` never imports ``personalize/`` (``launch.py`` composes the two and hands serving a job runner);
- serving's rooms keep to their side (:data:`ROOMS`): an engine folder imports only the seam, the shared
  sampling, the model and the errors, never another engine; memory imports no chat, engine, API or UI; chat
  imports no HTTP or UI and no concrete engine; the API and the UI import no concrete engine; ``personalize/``
  imports only the few serving modules listed in :data:`PERSONALIZE_MAY_IMPORT`;
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

ENGINE_FOLDERS = ("assistant.engines.hf", "assistant.engines.llamacpp", "assistant.engines.vllm")
SHARED = ("assistant.errors", "assistant.model", "assistant.file_checks", "assistant.processes", "assistant.web")
"""Serving's shared pieces at the top of ``assistant/``: any room may import them."""
ROOMS: dict[str, tuple[str, ...]] = {
    **{folder: ("assistant.engines.base", "assistant.engines.sampling", folder) for folder in ENGINE_FOLDERS},
    "assistant.engines.base": (),
    "assistant.engines.sampling": (),
    "assistant.memory": ("assistant.memory",),
    "assistant.chat": ("assistant.chat", "assistant.memory", "assistant.engines.base"),
    "assistant.api": ("assistant.api", "assistant.chat", "assistant.engines.base"),
    "assistant.ui": ("assistant.ui", "assistant.chat", "assistant.engines.base"),
}
"""Room (a package or module of ``assistant/``) -> the serving modules/packages it may import besides
:data:`SHARED`. ``engines.select`` and ``server`` (the composition root) may import any of them."""
PERSONALIZE_MAY_IMPORT = {"assistant.model", "assistant.errors", "assistant.file_checks", "assistant.processes",
                          "assistant.memory.text", "assistant.engines.llamacpp.gguf_lora"}
"""Serving modules training uses: the base model, shared errors and checks, the memory text forms (training
renders examples as serving does) and the GGUF converter (a published version gets its llama.cpp file)."""

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


def _imported(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """Every module ``module`` imports (any depth, type-only ones too; a name imported from a package counts as
    the submodule when there is one)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
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


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _room(module: str) -> str | None:
    return max((room for room in ROOMS if _within(module, room)), key=len, default=None)


def _rule_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for module, imports in graph.items():
        room = _room(module)
        for imported in imports:
            if _top(module) == "storage" and _top(imported) in STORAGE_MUST_NOT:
                bad.add((module, imported))
            if _top(module) == "assistant" and _top(imported) == "personalize":
                bad.add((module, imported))
            if _top(module) == "personalize" and _top(imported) == "assistant" and imported != "assistant" \
                    and imported not in PERSONALIZE_MAY_IMPORT:
                bad.add((module, imported))
            if room is not None and _top(imported) == "assistant" and imported not in ("assistant", *SHARED) \
                    and not any(_within(imported, allowed) for allowed in ROOMS[room]):
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


def test_the_import_reader_sees_function_local_and_type_only_imports():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from storage.db import Store\n"
                     "def f():\n    import torch\n    from storage import paths\n")
    assert _imported(tree, "storage.x", {"storage.paths"}) == {"typing", "storage.db", "torch", "storage.paths"}


def test_the_room_rules_catch_a_memory_module_reaching_for_the_chat_service():
    graph = {"assistant.memory.policy": {"assistant.chat.service", "assistant.errors", "storage.memories"},
             "assistant.engines.hf.backend": {"assistant.engines.vllm.backend", "assistant.engines.base"},
             "assistant.api.routes": {"assistant.chat.service", "assistant.engines.base"}}
    assert _rule_violations(graph) == {("assistant.memory.policy", "assistant.chat.service"),
                                       ("assistant.engines.hf.backend", "assistant.engines.vllm.backend")}


def test_serving_has_at_most_ten_modules_at_its_top_and_no_module_over_500_lines():
    """Code modules (bench/'s synthetic users are data)."""
    top = [p.name for p in (ROOT / "assistant").glob("*.py")]
    assert len(top) <= 10, f"assistant/ has {len(top)} modules at its top; put the rest in a room: {sorted(top)}"
    long = {str(path.relative_to(ROOT)): n for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > 500 and path.relative_to(ROOT).parts[0] != "bench"}
    assert not long, f"modules over 500 lines (split them): {long}"


def test_storage_assistant_and_the_rooms_import_only_downward():
    new = _rule_violations(_graph()) - ALLOWED
    assert not new, "imports that break the one-way rule (see tests/test_imports.py): " + ", ".join(
        f"{a} -> {b}" for a, b in sorted(new))


def test_no_import_cycles():
    new = _cycles(_graph(), CYCLE_EDGES)
    assert not new, "import circles, type-only imports included (move the shared piece down): " + "; ".join(
        " <-> ".join(sorted(c)) for c in new)


def test_the_allowlists_only_shrink():
    graph = _graph()
    gone = (ALLOWED - _rule_violations(graph)) | {(a, b) for a, b in CYCLE_EDGES if b not in graph.get(a, ())}
    assert not gone, f"fixed, remove from the allowlists in tests/test_imports.py: {sorted(gone)}"


def test_the_cycle_check_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "os"}, "d": {"a"}}
    assert _cycles(graph) == {frozenset({"a", "b", "c"})} and _cycles(graph, {("c", "a")}) == set()
