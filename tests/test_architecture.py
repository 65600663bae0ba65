"""Architecture rules, checked on the import graph built by parsing every file with `ast`.

Nothing under app/ is imported here: the graph comes from the source text, so the rules hold for every
import, whether at module level, inside a function, inside `if TYPE_CHECKING:` or inside `try:`.

How imports are resolved (`build_graph`):

* relative imports are resolved against the importing module's package;
* `import a.b.c` is an edge to `a.b.c`;
* `from a.b import c` is an edge to `a.b.c` when a/b/c.py (or a/b/c/__init__.py) exists, else an edge to
  `a.b` (c is a name defined in a/b/__init__.py or a/b.py);
* `importlib.import_module("a.b")` and `__import__("a.b")` with a constant string count too;
* an import of a module outside the package is recorded by its top-level name (`kserve.protocol` ->
  `kserve`).

Cycles are looked for among these explicit edges. The reach checks (what a layer pulls in at runtime)
also follow the implicit edge from a module to its parent packages, since importing `a.b.c` runs
a/__init__.py and a/b/__init__.py.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = "app"
TESTS = "tests"
MAX_LINES = 600

# Top-level packages that know HTTP, KServe, gRPC or Prometheus.
TRANSPORT_PACKAGES = frozenset(
    {
        "fastapi",
        "starlette",
        "kserve",
        "grpc",
        "grpc_interceptor",
        "prometheus_client",
        "sse_starlette",
        "uvicorn",
        "httpx",
    }
)


# ---------------------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """One import statement's effect: `source` (at `line`) imports `target`."""

    source: str
    target: str
    line: int
    internal: bool  # target is a module of the package; else target is a top-level external package


@dataclass
class Graph:
    package: str
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name -> file
    packages: set[str] = field(default_factory=set)  # dotted names that are packages (__init__.py)
    edges: dict[str, list[Edge]] = field(default_factory=dict)  # source -> its edges, in file order
    unresolved: list[str] = field(default_factory=list)  # "module:line imports X (no such module)"

    def internal(self, module: str) -> list[Edge]:
        return [e for e in self.edges.get(module, []) if e.internal]

    def external(self, module: str) -> list[Edge]:
        return [e for e in self.edges.get(module, []) if not e.internal]

    def under(self, prefix: str) -> list[str]:
        return sorted(m for m in self.modules if m == prefix or m.startswith(prefix + "."))


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def python_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def _dynamic_import_target(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x.y")` or `__import__("x.y")`, if constant."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in {"import_module", "__import__"} or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def build_graph(root: Path, package: str) -> Graph:
    """Parse every .py file of `root/package` and resolve its imports (see the module docstring)."""
    graph = Graph(package)
    trees: dict[str, ast.Module] = {}
    for path in python_files(root / package):
        name, is_package = module_name(path, root)
        graph.modules[name] = path
        if is_package:
            graph.packages.add(name)
        try:
            trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"cannot parse {path.relative_to(root)}: {exc}")

    def is_internal(dotted: str) -> bool:
        return dotted == package or dotted.startswith(package + ".")

    for name, tree in trees.items():
        edges: list[Edge] = []

        def add(target: str, line: int, source: str = name, out: list[Edge] = edges) -> None:
            if is_internal(target):
                if target not in graph.modules:
                    graph.unresolved.append(f"{source}:{line} imports {target} (no such module)")
                    return
                out.append(Edge(source, target, line, internal=True))
            else:
                out.append(Edge(source, target.split(".")[0], line, internal=False))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if name in graph.packages else name.split(".")[:-1]
                    if node.level - 1 > len(base) - 1:
                        graph.unresolved.append(f"{name}:{node.lineno} relative import beyond {package}")
                        continue
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + (node.module.split(".") if node.module else []))
                else:
                    origin = node.module or ""
                if not is_internal(origin):
                    add(origin, node.lineno)
                    continue
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    add(sub if alias.name != "*" and sub in graph.modules else origin, node.lineno)
            elif isinstance(node, ast.Call):
                target = _dynamic_import_target(node)
                if target:
                    add(target, node.lineno)
        graph.edges[name] = sorted(set(edges), key=lambda e: (e.line, e.target))
    return graph


# ---------------------------------------------------------------------------------------------------------
# The analyses
# ---------------------------------------------------------------------------------------------------------


def find_cycles(graph: Graph) -> list[list[Edge]]:
    """One concrete cycle per strongly connected component that has one (Tarjan, then a shortest loop)."""
    succ = {m: sorted({e.target for e in graph.internal(m)}) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    for start in sorted(graph.modules):  # iterative Tarjan: no recursion limit on deep graphs
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(succ[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in succ[node]:
                    components.append(sorted(component))

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path start -> ... -> start inside the component.
        parent: dict[str, Edge] = {}
        queue = deque([start])
        seen = {start}
        found: Edge | None = None
        while queue and found is None:
            node = queue.popleft()
            for edge in graph.internal(node):
                if edge.target == start:
                    found = edge
                    break
                if edge.target in members and edge.target not in seen:
                    seen.add(edge.target)
                    parent[edge.target] = edge
                    queue.append(edge.target)
        assert found is not None
        path = [found]
        while path[0].source != start:
            path.insert(0, parent[path[0].source])
        cycles.append(path)
    return cycles


def parents_of(module: str, package: str) -> list[str]:
    parts = module.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return [n for n in names if n == package or n.startswith(package + ".")]


def reach(graph: Graph, start: str) -> dict[str, Edge | None]:
    """Every module that importing `start` runs, with the edge it was first reached by (BFS: shortest)."""
    came_from: dict[str, Edge | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        nxt = list(graph.internal(node))
        nxt += [
            Edge(node, p, 0, internal=True) for p in parents_of(node, graph.package) if p in graph.modules
        ]
        for edge in nxt:
            if edge.target not in came_from:
                came_from[edge.target] = edge
                queue.append(edge.target)
    return came_from


def chain_to(came_from: dict[str, Edge | None], module: str) -> list[Edge]:
    chain: list[Edge] = []
    edge = came_from[module]
    while edge is not None:
        chain.insert(0, edge)
        edge = came_from[edge.source]
    return chain


def format_chain(chain: Iterable[Edge]) -> str:
    """`a:12 -> b (parent package) -> c:3 -> fastapi`: each step names the line of the import it follows."""
    chain = list(chain)
    if not chain:
        return ""
    text = chain[0].source
    for edge in chain:
        text += " (parent package)" if edge.line == 0 else f":{edge.line}"
        text += f" -> {edge.target}"
    return text


def forbidden_reach(
    graph: Graph, layer: str, forbidden_external: frozenset[str], forbidden_internal: str = ""
) -> list[str]:
    """For each module of `layer`, a shortest chain to each forbidden package it reaches, and to each
    module of `forbidden_internal` by which it enters that package (the modules behind it are not listed)."""

    def is_forbidden_module(name: str) -> bool:
        return bool(forbidden_internal) and (
            name == forbidden_internal or name.startswith(forbidden_internal + ".")
        )

    problems: list[str] = []
    for module in graph.under(layer):
        came_from = reach(graph, module)
        packages_seen: set[str] = set()
        for reached, entry in came_from.items():  # BFS order: the first chain found is a shortest one
            if is_forbidden_module(reached) and (entry is None or not is_forbidden_module(entry.source)):
                problems.append(f"{module} reaches {reached}: {format_chain(chain_to(came_from, reached))}")
            for edge in graph.external(reached):
                if edge.target in forbidden_external and edge.target not in packages_seen:
                    packages_seen.add(edge.target)
                    path = format_chain([*chain_to(came_from, reached), edge])
                    problems.append(f"{module} reaches {edge.target}: {path}")
    return sorted(problems)


def report(title: str, problems: list[str], limit: int = 40) -> str:
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(shown) + more


@pytest.fixture(scope="module")
def app_graph() -> Graph:
    return build_graph(ROOT, APP)


# ---------------------------------------------------------------------------------------------------------
# The rules on the real tree
# ---------------------------------------------------------------------------------------------------------


def test_import_graph_is_non_trivial(app_graph: Graph) -> None:
    assert len(app_graph.modules) > 40, (
        f"only {len(app_graph.modules)} app modules found: {sorted(app_graph.modules)}"
    )
    model_imports = {e.target for e in app_graph.internal("app.serving.model")}
    assert "app.serving.core.service" in model_imports, f"app.serving.model imports {sorted(model_imports)}"
    engine_edges = sum(len(app_graph.internal(m)) for m in app_graph.under("app.engine"))
    assert engine_edges > 10, f"only {engine_edges} imports between app.engine modules were found"
    externals = {e.target for m in app_graph.modules for e in app_graph.external(m)}
    assert {"kserve", "prometheus_client"} <= externals, (
        "the serving layer's kserve/prometheus imports were missed"
    )


def test_every_app_import_names_an_existing_module(app_graph: Graph) -> None:
    """An import of a missing app module would drop edges silently and let the other rules pass vacuously."""
    assert not app_graph.unresolved, report(
        "app imports that resolve to no file under app/", app_graph.unresolved
    )


def test_app_modules_import_no_circle(app_graph: Graph) -> None:
    cycles = find_cycles(app_graph)
    assert not cycles, report(
        "import cycles among app modules (one shortest circle per tangle)", [format_chain(c) for c in cycles]
    )


def test_engine_imports_nothing_of_http_kserve_grpc_prometheus_or_serving(app_graph: Graph) -> None:
    problems = forbidden_reach(app_graph, "app.engine", TRANSPORT_PACKAGES, forbidden_internal="app.serving")
    assert not problems, report("app.engine reaches transport packages or app.serving", problems)


@pytest.mark.parametrize("layer", ["app.serving.core", "app.serving.queue"])
def test_serving_core_and_queue_import_no_transport(app_graph: Graph, layer: str) -> None:
    assert app_graph.under(layer), f"no modules under {layer}"
    problems = forbidden_reach(app_graph, layer, TRANSPORT_PACKAGES)
    assert not problems, report(f"{layer} reaches HTTP/KServe/gRPC/Prometheus packages", problems)


def test_no_app_file_is_over_600_lines() -> None:
    long_files = []
    for path in python_files(ROOT / APP):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long_files, report(f"app files over {MAX_LINES} lines (split them)", long_files)


def test_no_test_module_imports_another_test_module() -> None:
    """No file under tests/ (test modules, support.py, conftest.py) imports a test module."""
    problems = imports_of_test_modules(build_graph(ROOT, TESTS), ROOT)
    assert not problems, report(
        "test modules imported (move shared code to tests/support.py or conftest.py)", problems
    )


def is_test_module(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("test_")


def imports_of_test_modules(graph: Graph, root: Path) -> list[str]:
    stems = {m.rsplit(".", 1)[-1] for m in graph.modules if is_test_module(m)}
    problems = []
    for module in sorted(graph.modules):
        for edge in graph.edges[module]:
            internal_hit = edge.internal and is_test_module(edge.target) and edge.target != module
            bare_hit = not edge.internal and edge.target in stems  # `import test_x` via rootdir on sys.path
            if internal_hit or bare_hit:
                problems.append(
                    f"{graph.modules[module].relative_to(root).as_posix()}:{edge.line} imports {edge.target}"
                )
    return problems


# ---------------------------------------------------------------------------------------------------------
# The checkers themselves, on tiny synthetic packages (so the rules above cannot pass vacuously)
# ---------------------------------------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_cycle_detector_finds_a_two_module_circle(tmp_path: Path) -> None:
    write_package(
        tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg.a\n"}
    )
    cycles = find_cycles(build_graph(tmp_path, "pkg"))
    assert [format_chain(c) for c in cycles] == ["pkg.a:1 -> pkg.b:1 -> pkg.a"]


def test_cycle_detector_sees_relative_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "from . import b\n",
            "pkg/sub/b.py": "def f():\n    from ..c import thing\n",
            "pkg/c.py": """\
                from typing import TYPE_CHECKING
                thing = 1
                if TYPE_CHECKING:
                    from pkg.sub.a import X
            """,
        },
    )
    graph = build_graph(tmp_path, "pkg")
    assert not graph.unresolved
    assert {e.target for e in graph.internal("pkg.sub.b")} == {"pkg.c"}  # a name in pkg/c.py: edge to pkg.c
    assert [format_chain(c) for c in find_cycles(graph)] == ["pkg.c:4 -> pkg.sub.a:1 -> pkg.sub.b:2 -> pkg.c"]


def test_cycle_detector_passes_a_clean_package(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\n",  # a package re-exporting its child is no circle
            "pkg/a.py": "from pkg import b\nA = b.B\n",
            "pkg/b.py": "import json\nB = 1\n",
        },
    )
    graph = build_graph(tmp_path, "pkg")
    assert find_cycles(graph) == []
    assert {e.target for e in graph.internal("pkg.a")} == {"pkg.b"}


def test_transitive_checker_finds_a_forbidden_package_two_hops_away(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core/__init__.py": "",
            "pkg/core/types.py": "from pkg.core import util\n",
            "pkg/core/util.py": "def f():\n    from pkg.web import metrics\n",
            "pkg/web/__init__.py": "",
            "pkg/web/metrics.py": "import json\nfrom prometheus_client import Counter\n",
        },
    )
    graph = build_graph(tmp_path, "pkg")
    problems = forbidden_reach(graph, "pkg.core", TRANSPORT_PACKAGES)
    assert (
        "pkg.core.types reaches prometheus_client: "
        "pkg.core.types:1 -> pkg.core.util:2 -> pkg.web.metrics:2 -> prometheus_client" in problems
    )
    assert forbidden_reach(graph, "pkg.core", TRANSPORT_PACKAGES, forbidden_internal="pkg.web")
    assert forbidden_reach(graph, "pkg.web", frozenset({"json"})) == [
        "pkg.web.metrics reaches json: pkg.web.metrics:1 -> json"
    ]


def test_transitive_checker_follows_parent_packages_and_passes_a_clean_layer(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core/__init__.py": "import kserve.protocol\n",  # runs whenever any pkg.core.* is imported
            "pkg/core/types.py": "import dataclasses\n",
            "pkg/engine/__init__.py": "",
            "pkg/engine/jobs.py": "from pkg.engine import params\nimport torch\n",
            "pkg/engine/params.py": "import math\n",
        },
    )
    graph = build_graph(tmp_path, "pkg")
    assert (
        "pkg.core.types reaches kserve: pkg.core.types (parent package) -> pkg.core:1 -> kserve"
        in forbidden_reach(graph, "pkg.core", TRANSPORT_PACKAGES)
    )
    assert forbidden_reach(graph, "pkg.engine", TRANSPORT_PACKAGES, forbidden_internal="pkg.core") == []


def test_unresolved_internal_imports_are_reported(tmp_path: Path) -> None:
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.gone import x\nimport pkg.b.c\n"})
    assert build_graph(tmp_path, "pkg").unresolved == [
        "pkg.a:1 imports pkg.gone (no such module)",
        "pkg.a:2 imports pkg.b.c (no such module)",
    ]


def test_test_module_import_checker_flags_test_modules_only(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "tests/__init__.py": "",
            "tests/support.py": "",
            "tests/sub/__init__.py": "",
            "tests/sub/test_a.py": "from tests.support import x\nfrom tests.sub import test_b\n",
            "tests/sub/test_b.py": "from .test_c import helper\nimport test_a\n",
            "tests/sub/test_c.py": "from tests import support\n",
        },
    )
    problems = imports_of_test_modules(build_graph(tmp_path, "tests"), tmp_path)
    assert problems == [
        "tests/sub/test_a.py:2 imports tests.sub.test_b",
        "tests/sub/test_b.py:1 imports tests.sub.test_c",
        "tests/sub/test_b.py:2 imports test_a",
    ]
