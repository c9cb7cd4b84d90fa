"""The packages' import structure (docs/architecture.md): no import cycle inside ``gnr_fast`` and
``gnr_shapes`` (the bundled model's world, training and evaluation), no module imports another
module's private (``_name``) names, and the engine never imports ``gnr_shapes`` (it reaches it
through entry points and ``gnr-fast eval``'s import by name).

The imports are read from the source with :mod:`ast`; nothing is imported or executed.

Which imports count: every ``import`` / ``from … import`` statement anywhere in a module — at
module level, inside functions and methods, and under ``if TYPE_CHECKING:``. Each one is a
dependency of the importing module on the imported one: a function-level import only postpones a
cycle from import time to call time (it is how a cycle is usually hidden, not removed), and an
annotation-only import still makes the lower module know the upper one's types. An import of
``a.b.c`` counts as a dependency on ``a.b.c`` alone, not on the packages ``a`` and ``a.b`` whose
``__init__`` Python runs first: a package re-exporting its own submodules is not a dependency of
those submodules, and a cycle through an ``__init__`` that runs at import time fails there with an
``ImportError`` that every test sees.

Private names: ``from m import _x``, ``import m._x`` and ``alias._x`` on a module alias, where the
other module is inside ``gnr_fast`` or ``gnr_shapes``. Private names of third-party libraries are their own business.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "gnr_fast"
PACKAGES = (ENGINE, "gnr_shapes")

KNOWN_CYCLES: dict[str, frozenset[str]] = {}
"""Cycles still to be removed, by name → the modules of the cycle (a strongly connected component).
Each entry must still be exactly such a component: one that is gone fails the test until it is
deleted here, so the list cannot go stale."""


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module of the packages: dotted name → (file, is a package ``__init__``)."""
    modules = {}
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


@dataclass(frozen=True)
class Import:
    """One imported thing: the module it names (inside the package) and, for ``from m import x``
    where ``x`` is not a submodule, the name ``x``."""

    importer: str
    module: str
    name: str | None
    line: int


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, path: Path, is_package: bool, modules: dict) -> list[Import]:
    """Every import of a package module in ``path``, wherever the statement is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, is_package, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(
                    Import(importer, submodule, None, node.lineno) if submodule in modules
                    else Import(importer, base, alias.name, node.lineno)
                )
    return [i for i in found if i.module.split(".")[0] in PACKAGES]


def all_imports() -> list[Import]:
    modules = module_files()
    return [i for name, (path, is_package) in modules.items() for i in imports_of(name, path, is_package, modules)]


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """importer → the package modules it imports (a name of a module counts as that module)."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for i in imports:
        target = i.module
        while target not in modules and "." in target:  # `import gnr_fast.x.y.name`-style paths
            target = target.rsplit(".", 1)[0]
        if target != i.importer:
            graph[i.importer].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative); each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(frozenset(component))
    return components


def a_cycle(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """One shortest cycle through the first module of ``component``, as ``a -> b -> … -> a``."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return " -> ".join(paths[node] + [start])
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_finds_a_cycle_and_only_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [frozenset("abc")]
    assert a_cycle(frozenset("abc"), graph) == "a -> b -> c -> a"
    graph["c"] = set()
    assert strongly_connected(graph) == []


def test_no_import_cycles_inside_the_package():
    graph = import_graph(all_imports())
    found = strongly_connected(graph)
    unexpected = [f"{a_cycle(c, graph)} (of {len(c)} modules in a cycle)" for c in found if c not in KNOWN_CYCLES.values()]
    assert not unexpected, "import cycles inside gnr_fast / gnr_shapes (each arrow: imports):\n" + "\n".join(unexpected)
    gone = [name for name, component in KNOWN_CYCLES.items() if component not in found]
    assert not gone, f"known cycles {gone} are gone (or changed): update KNOWN_CYCLES in {Path(__file__).name}"


def test_no_module_imports_another_modules_private_names():
    offences = []
    for i in all_imports():
        if i.module == i.importer:
            continue
        private_path = [part for part in i.module.split(".") if part.startswith("_") and not part.startswith("__")]
        if private_path or (i.name is not None and i.name.startswith("_") and not i.name.startswith("__")):
            offences.append(f"{i.importer}:{i.line} imports {i.module}{'.' + i.name if i.name else ''}")
    modules = module_files()
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node)
                aliases.update({a.asname or a.name: f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name):
                offences.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offences, "imports of another module's private names:\n" + "\n".join(offences)


def test_the_engine_never_imports_the_shapes_package():
    offences = [f"{i.importer}:{i.line} imports {i.module}" for i in all_imports()
                if i.importer.split(".")[0] == ENGINE and i.module.split(".")[0] != ENGINE]
    assert not offences, ("gnr_fast imports gnr_shapes (use the gnr_fast.caption_grammars entry points):\n"
                          + "\n".join(offences))
