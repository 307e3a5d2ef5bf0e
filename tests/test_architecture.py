"""The package's floor plan, read from its source with `ast`: this file never imports `learner`.

The stairs go one way. At the bottom sit the leaves, which import nothing of the package but one
another; `learner/core.py` stands on a few of them; callbacks, saving, inference and the rest stand
on `core`; the package `__init__` re-exports them. These tests pin that shape: no import cycles,
what the bottom floors may import, no reaching for another module's private names, one file per
name, no imports hidden in functions, and an `__all__` that lists only names the module defines.

"Imports" are those that run: statements anywhere in a module, in functions and methods too, and
`importlib.import_module("learner...")` calls; not those under `if TYPE_CHECKING:`. Importing
`learner.a.b` from outside the package `learner.a` also runs `learner/a/__init__.py`, so it is an
import of `learner.a` as well. (The root `learner/__init__.py` runs first whatever is imported, so
it is nobody's import but of those that name it.)
"""

from __future__ import annotations

import ast
import functools
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "learner"
TESTS = ROOT / "tests"

# What learner/core.py may import from the package: leaves only.
CORE = "learner.core"
CORE_MAY_IMPORT = frozenset(
    {
        "learner.checks",
        "learner.utils",
        "learner.events",
        "learner.batches",
        "learner.steps",
        "learner.optimizers",
    }
)

# The bottom floor: each imports nothing of the package except other modules of this set.
LEAVES = frozenset(
    {
        "learner.utils",
        "learner.checks",
        "learner.rng",
        "learner.io",
        "learner.distributed",
        "learner.data",
        "learner.hooks",
        "learner.plotting",
        "learner.callbacks.order",
        "learner.events",
        "learner.batches",
        "learner.steps",
        "learner.optimizers",
    }
)
# Leaves that import nothing of the package at all.
BARE_LEAVES = frozenset({"learner.data", "learner.optimizers"})

# How much of a circle of imports the failure message prints.
CYCLES_SHOWN = 12
CUT_FIRST_SHOWN = 6


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@dataclass(frozen=True)
class Import:
    """`statement` at `where` makes module `importer` run module `target`."""

    importer: str
    target: str
    where: str  # file:line
    statement: str
    in_function: bool
    type_checking: bool
    via_package: bool  # `target` is a package whose __init__ runs on the way to a submodule

    def __str__(self) -> str:
        text = f"{self.where}: `{self.statement}`"
        if self.in_function:
            text += " (in a function)"
        if self.via_package:
            text += f" (runs {self.target.replace('.', '/')}/__init__.py)"
        return text


@dataclass(frozen=True)
class NameImport:
    """`from <source> import <name>` in module `importer`, at `where`."""

    importer: str
    source: str
    name: str
    where: str


class Package:
    """The modules of package `name` under `root`, and every import of the package among them."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.paths = {module_name(root, p): p for p in sorted((root / name).rglob("*.py"))}
        self.trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in self.paths.items()}
        self.imports: list[Import] = []
        self.name_imports: list[NameImport] = []
        self.unresolved: list[str] = []
        for module, tree in self.trees.items():
            ImportReader(self, module).visit(tree)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def is_package(self, module: str) -> bool:
        return self.paths[module].name == "__init__.py"

    def contains(self, dotted: str) -> bool:
        return dotted == self.name or dotted.startswith(self.name + ".")

    def runtime_imports(self) -> list[Import]:
        return [i for i in self.imports if not i.type_checking and i.target != i.importer]

    def graph(self) -> dict[str, dict[str, Import]]:
        """importer -> target -> the import that makes the edge (top-level ones first)."""
        edges: dict[str, dict[str, Import]] = {module: {} for module in self.paths}
        for imp in sorted(
            self.runtime_imports(), key=lambda i: (i.in_function, int(i.where.rpartition(":")[2]))
        ):
            edges[imp.importer].setdefault(imp.target, imp)
        return edges


class ImportReader(ast.NodeVisitor):
    """Notes each import of the package in one module, and whether it sits in a function."""

    def __init__(self, pkg: Package, module: str) -> None:
        self.pkg, self.module = pkg, module
        self.file = pkg.rel(pkg.paths[module])
        self.function_depth = 0
        self.type_checking_depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking_depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking_depth -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self.pkg.contains(alias.name):
                self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.absolute(node)
        if base is None or not self.pkg.contains(base):
            return
        if base not in self.pkg.paths:
            self.pkg.unresolved.append(f"{self.where(node)}: `{statement(node)}`: no module {base}")
            return
        targets = []  # `from learner.callbacks import order, Callback` imports two modules
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.append(submodule if submodule in self.pkg.paths else base)
            self.pkg.name_imports.append(
                NameImport(self.module, base, alias.name, self.where(node))
            )
        for target in dict.fromkeys(targets):
            self.add(target, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        name = node.args[0] if node.args else None
        if (
            called in ("import_module", "__import__")
            and isinstance(name, ast.Constant)
            and isinstance(name.value, str)
            and self.pkg.contains(name.value)
        ):
            self.add(name.value, node)
        self.generic_visit(node)

    def absolute(self, node: ast.ImportFrom) -> str | None:
        """The module a `from ... import` names, relative imports resolved."""
        if not node.level:
            return node.module
        here = self.module.split(".")
        if not self.pkg.is_package(self.module):
            here.pop()
        if node.level - 1 >= len(here):
            return None
        here = here[: len(here) - (node.level - 1)]
        return ".".join([*here, node.module] if node.module else here)

    def where(self, node: ast.stmt | ast.expr) -> str:
        return f"{self.file}:{node.lineno}"

    def add(self, target: str, node: ast.stmt | ast.expr) -> None:
        if target not in self.pkg.paths:
            self.pkg.unresolved.append(
                f"{self.where(node)}: `{statement(node)}`: no module {target}"
            )
            return
        parts = target.split(".")
        # Packages on the way to `target` that the importer is not itself inside of.
        packages = [".".join(parts[:n]) for n in range(2, len(parts))]
        for module in [target, *packages]:
            if module != target and (self.module + ".").startswith(module + "."):
                continue
            self.pkg.imports.append(
                Import(
                    importer=self.module,
                    target=module,
                    where=self.where(node),
                    statement=statement(node),
                    in_function=self.function_depth > 0,
                    type_checking=self.type_checking_depth > 0,
                    via_package=module != target,
                )
            )


def statement(node: ast.AST, width: int = 100) -> str:
    text = ast.unparse(node)
    return text if len(text) <= width else text[: width - 3] + "..."


@functools.cache
def package() -> Package:
    return Package(ROOT, PACKAGE)


def fail(problem: str, lines: Iterable[object]) -> None:
    lines = [str(line) for line in lines]
    if lines:
        pytest.fail(f"{problem}:\n" + "\n".join(f"  {line}" for line in lines), pytrace=False)


# ---------------------------------------------------------------------------------------------
# Cycles

Graph = dict[str, dict[str, Import]]


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that all reach one another, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups, key=lambda g: (-len(g), g))


def shortest_path(graph: Graph, start: str, goal: str, within: set[str]) -> list[str]:
    previous: dict[str, str] = {}
    queue, seen = deque([start]), {start}
    while goal not in seen:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w in within and w not in seen:
                previous[w] = v
                seen.add(w)
                queue.append(w)
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def cycles(graph: Graph, group: list[str]) -> list[list[str]]:
    """A shortest cycle through each import inside `group` (strongly connected), shortest first."""
    within = set(group)
    found: set[tuple[str, ...]] = set()
    for u in group:
        for v in graph[u]:
            if v in within:
                cycle = [u, *shortest_path(graph, v, u, within)[:-1]]
                start = cycle.index(min(cycle))
                found.add(tuple(cycle[start:] + cycle[:start]))
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def edges_of(cycle: list[str]) -> list[tuple[str, str]]:
    return list(zip(cycle, [*cycle[1:], cycle[0]]))


def describe_cycles(graph: Graph) -> Iterator[str]:
    groups = [g for g in strongly_connected(graph) if len(g) > 1 or g[0] in graph[g[0]]]
    for group in groups:
        found = cycles(graph, group)
        yield f"{len(group)} modules import one another in a circle: {', '.join(group)}"
        on_most = Counter(edge for cycle in found for edge in edges_of(cycle))
        yield f"  the imports on most of its {len(found)} shortest cycles:"
        for (a, b), n in on_most.most_common(CUT_FIRST_SHOWN):
            yield f"    {a} -> {b} (on {n}): {graph[a][b]}"
        yield "  the shortest cycles:"
        for cycle in found[:CYCLES_SHOWN]:
            yield "    " + " -> ".join([*cycle, cycle[0]])
            for a, b in edges_of(cycle):
                yield f"        {graph[a][b]}"
        if len(found) > CYCLES_SHOWN:
            yield f"    ... and {len(found) - CYCLES_SHOWN} more"


def test_no_import_cycles() -> None:
    fail("Import cycles (the stairs must go one way)", describe_cycles(package().graph()))


# ---------------------------------------------------------------------------------------------
# The bottom floors


def test_core_imports_only_leaves() -> None:
    pkg = package()
    assert CORE_MAY_IMPORT <= LEAVES, f"not in LEAVES: {sorted(CORE_MAY_IMPORT - LEAVES)}"
    assert CORE in pkg.paths, f"no module {CORE}"
    fail(
        f"{CORE} may import from the package only {', '.join(sorted(CORE_MAY_IMPORT))}",
        (
            f"{i} imports {i.target}"
            for i in pkg.runtime_imports()
            if i.importer == CORE and i.target not in CORE_MAY_IMPORT
        ),
    )


def test_leaves_import_only_leaves() -> None:
    pkg = package()
    problems = [
        f"{m}: listed as a leaf, but no such module" for m in sorted(LEAVES - pkg.paths.keys())
    ]
    for i in pkg.runtime_imports():
        if i.importer in BARE_LEAVES:
            problems.append(f"{i}: {i.importer} may import nothing of the package")
        elif i.importer in LEAVES and i.target not in LEAVES:
            problems.append(f"{i}: {i.importer} is a leaf, {i.target} is not")
    fail(f"Leaves import only other leaves ({', '.join(sorted(LEAVES))})", problems)


# ---------------------------------------------------------------------------------------------
# Private names, private modules, one file per name


def test_no_private_names_imported_from_other_modules() -> None:
    fail(
        "Private names imported from another module (make the name public, or move it)",
        (
            f"{n.where}: `from {n.source} import {n.name}`"
            for n in package().name_imports
            if is_private(n.name) and n.source != n.importer
        ),
    )


def test_no_private_modules() -> None:
    pkg = package()
    fail(
        "Private modules (drop the leading underscore)",
        (
            pkg.rel(path)
            for module, path in pkg.paths.items()
            if any(is_private(part) for part in module.split("."))
        ),
    )


def duplicate_basenames(paths: Iterable[Path], ignore: set[str]) -> Iterator[str]:
    by_name: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(paths):
        if path.name not in ignore:
            by_name[path.name].append(path)
    for name, same in sorted(by_name.items()):
        if len(same) > 1:
            yield f"{name}: {', '.join(p.relative_to(ROOT).as_posix() for p in same)}"


def test_module_basenames_are_unique() -> None:
    fail(
        "File names used by more than one module of the package",
        duplicate_basenames((ROOT / PACKAGE).rglob("*.py"), {"__init__.py"}),
    )


def test_test_basenames_are_unique() -> None:
    # pytest imports each conftest.py by its folder, so those may repeat.
    fail(
        "File names used more than once under tests/",
        duplicate_basenames(TESTS.rglob("*.py"), {"__init__.py", "conftest.py"}),
    )


# ---------------------------------------------------------------------------------------------
# Imports at the top


def test_no_imports_of_the_package_in_functions() -> None:
    # Lazy imports of optional third-party packages (tensorboard, sklearn, torcheval) are fine.
    fail(
        "Imports of the package inside functions (a deferred import that breaks a cycle is a "
        "sign the module is on the wrong floor: import at the top of the module)",
        (
            i
            for i in package().imports
            if i.in_function and not i.type_checking and not i.via_package
        ),
    )


def test_imports_of_the_package_name_modules_that_exist() -> None:
    fail("Imports of modules the package does not have", package().unresolved)


# ---------------------------------------------------------------------------------------------
# __all__


def bound_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from bound_names(element)
    elif isinstance(target, ast.Starred):
        yield from bound_names(target.value)


def module_level_names(body: list[ast.stmt]) -> Iterator[str]:
    """The names a module binds when it runs (not those under `if TYPE_CHECKING:`)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt.name
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                yield from bound_names(target)
        elif isinstance(stmt, ast.AugAssign) or (
            isinstance(stmt, ast.AnnAssign) and stmt.value is not None
        ):
            yield from bound_names(stmt.target)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                yield (alias.asname or alias.name).split(".")[0]
        elif isinstance(stmt, ast.If):
            if not is_type_checking(stmt.test):
                yield from module_level_names(stmt.body)
            yield from module_level_names(stmt.orelse)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            yield from bound_names(stmt.target)
            yield from module_level_names(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.While):
            yield from module_level_names(stmt.body + stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    yield from bound_names(item.optional_vars)
            yield from module_level_names(stmt.body)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            for block in [stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody]:
                yield from module_level_names(block)


def dunder_all(tree: ast.Module) -> tuple[int, list[str]] | str | None:
    """(line, names) of the module's `__all__`, None without one, a message if unreadable."""
    line, names = 0, []
    for stmt in tree.body:
        if not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            continue
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            continue
        value = stmt.value
        if not isinstance(value, (ast.List, ast.Tuple)) or not all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts
        ):
            return f"{stmt.lineno}: __all__ is not a literal list of strings"
        if not isinstance(stmt, ast.AugAssign):
            names = []
        names += [e.value for e in value.elts if isinstance(e, ast.Constant)]
        line = line or stmt.lineno
    return (line, names) if line else None


def test_public_modules_have_an_all_of_names_they_define() -> None:
    pkg = package()
    problems = []
    for module, tree in pkg.trees.items():
        file = pkg.rel(pkg.paths[module])
        if any(is_private(part) for part in module.split(".")):
            continue  # test_no_private_modules reports it
        found = dunder_all(tree)
        if found is None:
            problems.append(f"{file}: no __all__")
            continue
        if isinstance(found, str):
            problems.append(f"{file}:{found}")
            continue
        line, names = found
        defined = set(module_level_names(tree.body))
        if pkg.is_package(module):  # `from package import *` imports the submodules it lists
            defined |= {m.rpartition(".")[2] for m in pkg.paths if m.rpartition(".")[0] == module}
        if any(isinstance(s, ast.ImportFrom) and s.names[0].name == "*" for s in tree.body):
            problems.append(f"{file}: `from ... import *`: its __all__ cannot be checked")
        missing = [name for name in names if name not in defined]
        if missing:
            problems.append(f"{file}:{line}: __all__ lists undefined {', '.join(missing)}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            problems.append(f"{file}:{line}: __all__ lists more than once {', '.join(twice)}")
    fail("Each public module has an __all__ of names it defines", problems)


# ---------------------------------------------------------------------------------------------
# The reader itself, on a package small enough to know every answer


def test_the_import_reader_on_a_tiny_package(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "from pkg.a import A\nfrom . import b\n__all__ = ['A', 'b']\n",
        "pkg/a.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from pkg.sub.c import C\n"
            "else:\n"
            "    import pkg.b\n"
            "A = 1\n"
            "def f():\n"
            "    from .sub import c\n"
            "    import importlib\n"
            "    return importlib.import_module('pkg.b')\n"
        ),
        "pkg/b.py": "from pkg.sub.c import _hidden, C\nfrom pkg.gone import x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import A\nfrom . import c2\n",
        "pkg/sub/c2.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    pkg = Package(tmp_path, "pkg")
    got = {
        (i.importer, i.target, i.where, i.in_function, i.type_checking, i.via_package)
        for i in pkg.imports
    }
    assert got == {
        ("pkg", "pkg.a", "pkg/__init__.py:1", False, False, False),
        ("pkg", "pkg.b", "pkg/__init__.py:2", False, False, False),
        ("pkg.a", "pkg.sub.c", "pkg/a.py:3", False, True, False),
        ("pkg.a", "pkg.sub", "pkg/a.py:3", False, True, True),
        ("pkg.a", "pkg.b", "pkg/a.py:5", False, False, False),
        ("pkg.a", "pkg.sub.c", "pkg/a.py:8", True, False, False),
        ("pkg.a", "pkg.sub", "pkg/a.py:8", True, False, True),
        ("pkg.a", "pkg.b", "pkg/a.py:10", True, False, False),
        ("pkg.b", "pkg.sub.c", "pkg/b.py:1", False, False, False),
        ("pkg.b", "pkg.sub", "pkg/b.py:1", False, False, True),
        ("pkg.sub.c", "pkg.a", "pkg/sub/c.py:1", False, False, False),
        ("pkg.sub.c", "pkg.sub.c2", "pkg/sub/c.py:2", False, False, False),
    }
    assert pkg.unresolved == ["pkg/b.py:2: `from pkg.gone import x`: no module pkg.gone"]
    assert [n.name for n in pkg.name_imports if is_private(n.name)] == ["_hidden"]
    graph = pkg.graph()
    group = ["pkg.a", "pkg.b", "pkg.sub.c"]
    assert [g for g in strongly_connected(graph) if len(g) > 1] == [group]
    assert graph["pkg.a"]["pkg.b"].where == "pkg/a.py:5"  # the top-level import, not f's
    assert cycles(graph, group) == [["pkg.a", "pkg.sub.c"], ["pkg.a", "pkg.b", "pkg.sub.c"]]
