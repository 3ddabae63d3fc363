"""No import cycles among the modules of ``pyfast_tune``: what two modules share goes into a
leaf module both import.

The check reads the source (``ast``), so it needs neither torch nor the Rust extension. An edge
A -> B is an import that runs when A is imported: a statement at module level (class bodies,
``try``/``if`` blocks included), not one inside a function (a lazy import, allowed to break a
cycle on purpose) and not under ``if TYPE_CHECKING:``. ``from pkg import name`` is an edge to
the submodule ``pkg.name`` when that file exists, else to ``pkg`` itself; relative imports are
resolved against the importing module's package. Importing ``a.b.c`` does run ``a/__init__``
and ``a/b/__init__`` first, but a package's ``__init__`` importing its own submodules, which
import each other by absolute path, is how Python packages work, not a cycle: parents are not
edges (as in pylint's ``cyclic-import``).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "pyfast_tune"


def module_names(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, lazy: bool):
    """Import statements that run when the module is imported (not in functions or lambdas);
    with ``lazy``, those in functions too."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # a lazy edge: runs on call, not on import
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_edges(modules: dict[str, Path], lazy: bool = False) -> dict[str, set[str]]:
    """{module: modules of the package it imports at module level (``lazy``: anywhere)}."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)), lazy):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path ending where it starts) per strongly connected component of more than
    one module, found with Tarjan's algorithm; sorted so the report is stable."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the package's module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(_cycle_in(c, edges) for c in components)


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    inside, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")  # Tarjan guarantees one


def cycles_of(root: Path, lazy: bool = False, under: str = "") -> list[list[str]]:
    """Cycles among the modules of the package at ``root`` (only those named ``under*``)."""
    modules = {n: p for n, p in module_names(root).items() if n.startswith(under)}
    return find_cycles(import_edges(modules, lazy))


def test_pyfast_tune_has_no_import_cycles():
    cycles = cycles_of(PACKAGE_ROOT)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )


def test_kernels_have_no_cycles_even_through_lazy_imports():
    """The kernels go further: not even an import inside a function closes a cycle. The guard
    finds each op's check by module path (``guard.registry``), so the generic mechanism never
    imports its plugins; each op package imports the guard, never the reverse."""
    cycles = cycles_of(PACKAGE_ROOT, lazy=True, under="pyfast_tune.kernels")
    assert not cycles, "import cycles in pyfast_tune.kernels (any import):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_check_finds_an_injected_cycle_of_every_import_form(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import f\n",
            "a.py": "from . import b\n",  # relative, naming a submodule
            "b.py": "import pkg.sub.c\n",  # absolute
            "sub/__init__.py": "",
            "sub/c.py": "try:\n    from ..a import f\nexcept ImportError:\n    pass\n",
            "d.py": "from pkg.sub import c\n",  # into the cycle, not part of it
        },
    )
    assert cycles_of(root) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_the_check_ignores_lazy_and_type_checking_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg import a
                def f():
                    import pkg.a
                g = lambda: __import__("pkg.a")
                """,
        },
    )
    assert cycles_of(root) == []
    (root / "b.py").write_text("class K:\n    from pkg import a\n")  # a class body runs
    assert cycles_of(root) == [["pkg.a", "pkg.b", "pkg.a"]]
