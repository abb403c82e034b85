"""No import circle in the library (lib/vfiotest, the CLI included).

The imports are read from the source with `ast`, not by importing: every `import` and
`from ... import` statement counts, at module level or inside a function (a function-level
import that dodges a circle at load time is still a circle in the design). Relative imports
are resolved against the importing module's package; `from pkg import name` counts as an
import of `pkg.name` when that is a module of the library, else of `pkg`. Importing `a.b.c` runs
the package `a.b` first, so that is an edge too (except to the importer's own packages, which
Python has loaded before the importer itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "lib"
PACKAGE = "vfiotest"


def library_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file under lib/vfiotest."""
    modules: dict[str, Path] = {}
    for path in sorted((LIB / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(LIB).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules `name` (at `path`) imports, wherever in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the longest library module that `target` names (a.b.c -> a.b if a.b.c is not a module)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith(PACKAGE):
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                add(candidate if candidate in modules else source)
    for target in list(found):
        parent = target.rpartition(".")[0]
        while parent:
            if not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
            parent = parent.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def a_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle through the component's first module, for the message: a -> b -> a."""
    members = set(component)
    start = component[0]
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop(0)
        for succ in sorted(graph[path[-1]] & members):
            if succ == start:
                return path + [start]
            if succ not in seen:
                seen.add(succ)
                paths.append(path + [succ])
    return component


def test_the_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    # the test's own reader must see what it claims to: a circle hidden in a function counts
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n    return x\n")
    modules = {
        "vfiotest": package / "__init__.py",
        "vfiotest.a": package / "a.py",
        "vfiotest.sub": package / "sub" / "__init__.py",
        "vfiotest.sub.b": package / "sub" / "b.py",
    }
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["vfiotest.a"] == {"vfiotest.sub.b", "vfiotest.sub"}  # importing sub.b runs sub first
    assert graph["vfiotest.sub.b"] == {"vfiotest.a"}
    assert cycles(graph) == [["vfiotest.a", "vfiotest.sub.b"]]


def test_no_import_circle_in_the_library() -> None:
    graph = import_graph()
    assert "vfiotest.cli" in graph and "vfiotest.session" in graph  # the reader found the library
    found = cycles(graph)
    assert not found, "import circles in lib/vfiotest:\n" + "\n".join(
        " -> ".join(a_path(graph, component)) + f"   (all of: {', '.join(component)})" for component in found
    )


def test_the_ci_scripts_import_the_library_by_its_name() -> None:
    """ci/campaign.py runs as a script (ci/campaign execs it), not as a package module: a relative
    import in it fails only when the line runs (the quick campaign crashed on one, in a function)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    for script in sorted((root / "ci").glob("*.py")):
        tree = ast.parse(script.read_text(), str(script))
        relative = [f"line {n.lineno}: from {'.' * n.level}{n.module or ''}" for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{script.name}: relative imports {relative}"
