"""The package has no import cycles, counting the imports inside functions.

The graph is built from the source with ``ast``, without importing anything. Its nodes are the modules of
``instaflow_pl`` (a package is its ``__init__``); an edge ``a -> b`` means that ``a`` imports ``b`` somewhere:

- every ``import`` and ``from ... import`` statement counts, at module level or inside a function or class, except
  those under ``if TYPE_CHECKING:``, which never run;
- ``import a.b.c`` is an edge to ``a.b.c``;
- ``from p import n`` is an edge to the submodule ``p.n`` when there is one, else to ``p``. When ``p`` is the
  importing module's own ancestor package (already being imported when the module runs), a name that ``p``'s
  ``__init__`` only re-exports from a submodule resolves through to that submodule, so a module that takes a
  sibling's name from its package is an edge to the sibling, not to the package. From any other package, the edge
  stays on the package: importing it runs its ``__init__``, and the ``__init__``'s own imports are edges too.

Imports by name at run time (``importlib``, class paths in configs) are not statements and do not count.
A cycle is printed as ``a -> b -> c -> a`` (one shortest cycle through each module of each strongly connected part).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = "instaflow_pl"
SOURCE = Path(__file__).resolve().parents[2] / "src" / PACKAGE


def module_files(root: Path = SOURCE) -> dict[str, Path]:
    """Module name -> its file, for every module of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it is, but not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
            continue
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)
    return found


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import takes its names from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def reexports(package: str, trees: dict[str, ast.AST], modules: dict[str, Path]) -> dict[str, str]:
    """Name -> the package module it comes from, for the names a package's ``__init__`` imports from its modules."""
    names = {}
    for node in import_statements(trees[package]):
        if isinstance(node, ast.ImportFrom):
            base = _base(package, True, node)
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules and target != package:
                    names[alias.asname or alias.name] = target
    return names


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    modules = module_files(root)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, tree in trees.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for node in import_statements(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base(module, module in packages, node)
                targets = []
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target not in modules:
                        target = base
                        if base in ancestors and base in packages:
                            target = reexports(base, trees, modules).get(alias.name, base)
                    targets.append(target)
            for target in targets:
                while target and target not in modules:  # `import a.b.attr` style: the longest module prefix
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    part = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        part.append(member)
                        if member == node:
                            break
                    if len(part) > 1:
                        parts.append(sorted(part))
    return parts


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest cycle through ``start`` inside ``within``, as a list of modules ending where it starts."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & within):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return [start]


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle found, as ``a -> b -> c -> a``: a shortest one through each module of each cyclic part."""
    found: dict[frozenset, str] = {}
    for part in strongly_connected(graph):
        for module in part:
            cycle = shortest_cycle(graph, module, set(part))
            body = cycle[:-1]
            first = body.index(min(body))  # written from its smallest name, so a cycle appears once
            body = body[first:] + body[:first]
            found.setdefault(frozenset(zip(body, body[1:] + body[:1], strict=True)), " -> ".join([*body, body[0]]))
    return sorted(found.values())


def test_the_graph_sees_imports_inside_functions():
    """The graph has the edges this test relies on: imports in functions and methods, a package importing its
    modules, and a sibling's name taken from the parent package resolved to the sibling."""
    graph = import_graph()
    assert "instaflow_pl.sweep.main" in graph["instaflow_pl.cli"]  # inside a function
    assert "instaflow_pl.callbacks.progress" in graph["instaflow_pl.lightning_cli"]  # inside a method
    assert "instaflow_pl.callbacks.budgets" in graph["instaflow_pl.callbacks"]
    assert "instaflow_pl.sweep.spec" in graph["instaflow_pl.sweep.local"]


def test_a_name_from_the_parent_package_resolves_to_the_sibling_that_defines_it(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from instaflow_pl.sub.a import A\nB = 1\n")
    (package / "sub" / "a.py").write_text("A = 1\n")
    (package / "sub" / "b.py").write_text("def f():\n    from instaflow_pl.sub import A, B\n")
    (package / "c.py").write_text("from .sub import A\n")
    graph = import_graph(package)
    assert graph[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.sub.a", f"{PACKAGE}.sub"}  # A via its sibling; B is the package's
    assert graph[f"{PACKAGE}.c"] == {f"{PACKAGE}.sub"}  # from another package: its __init__ runs
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.a"}
    assert cycles(graph) == []


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"d2"}, "d2": {"d"}, "e": set()}
    assert cycles(graph) == ["a -> b -> c -> a", "d -> d2 -> d"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (counting imports inside functions):\n" + "\n".join(found)
