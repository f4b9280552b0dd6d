"""The code's layers, lowest first, and the rule that each imports only its own layer or lower ones.

Every import counts: top-level ones, those inside functions, ``importlib.import_module("literal")``
and registry strings of the form ``"package.module:Attribute"`` (how the family registry loads a
family). An import the walker cannot resolve to a module of this checkout is not an edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "storage", "modeling", "stages", "benchmarks", "run_pipeline.py")

# The layer order (docs/layout.md mirrors it). A module belongs to the layer of its longest listed
# prefix; a module may import modules of its own layer or of a layer above it in this list.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("pipeline", "pipeline.core", "modeling")),
    ("data", ("pipeline.data",)),
    ("engine", ("pipeline.engine",)),
    ("storage", ("storage",)),
    ("targets", ("modeling.targets",)),
    ("target I/O", ("modeling.target_io",)),
    ("draft", ("modeling.draft",)),
    ("training", ("modeling.training",)),
    ("target builders and the vLLM plugin", ("modeling.asr_target", "modeling.smol_audio", "modeling.vllm_plugin")),
    ("stages", ("stages",)),
    ("orchestration and tools", ("pipeline.cluster", "pipeline.tools", "run_pipeline")),
    ("benchmarks", ("benchmarks",)),
]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under :data:`SCANNED`."""
    out: dict[str, Path] = {}
    for entry in SCANNED:
        path = root / entry
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = file
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(tree: ast.AST, package: str) -> list[tuple[str, int]]:
    """(dotted name, line) of everything a module imports, as precisely as the syntax says."""
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # ``from a import b``: the module a.b when it is one, else a itself
            names += [(f"{base}.{a.name}", node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            module, _, attribute = node.value.partition(":")
            if module.replace(".", "").replace("_", "").isalnum() and "." in module and attribute.isidentifier():
                names.append((module, node.lineno))  # a "module:Attribute" registry entry
    return names


def import_edges(root: Path = ROOT) -> list[Edge]:
    modules = module_files(root)
    edges: set[Edge] = set()
    for module, file in modules.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for name, line in _imported_names(ast.parse(file.read_text(), str(file)), package):
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.add(Edge(module, target, f"{file.relative_to(root)}:{line}"))
    return sorted(edges, key=str)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")
    return best


def upward_edges(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if layer_of(e.target) > layer_of(e.source)]


def circles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


EDGES = import_edges()


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_goes_up_a_layer():
    bad = [f"{e}: {LAYERS[layer_of(e.source)][0]} imports {LAYERS[layer_of(e.target)][0]}"
           for e in upward_edges(EDGES)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_circles():
    found = circles(EDGES)
    detail = ["circle: " + " <-> ".join(c) + "\n  " + "\n  ".join(
        str(e) for e in EDGES if e.source in c and e.target in c) for c in found]
    assert not found, "\n".join(detail)


@pytest.mark.parametrize("bad_import", ["from stages.dump import DumpConfig\n",
                                        "def f():\n    import importlib\n    importlib.import_module('stages.dump')\n"])
def test_the_walker_sees_a_bad_import(tmp_path, bad_import):
    # a foundations module that imports a stage, at the top or hidden in a function: both are caught
    for entry in SCANNED:
        source = ROOT / entry
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        if source.is_file():
            (tmp_path / entry).write_text(source.read_text())
        else:
            for file in source.rglob("*.py"):
                copy = tmp_path / file.relative_to(ROOT)
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(file.read_text())
    durable = tmp_path / "pipeline" / "core" / "durable.py"
    durable.write_text(durable.read_text() + "\n" + bad_import)
    edges = import_edges(tmp_path)
    assert [str(e.target) for e in upward_edges(edges) if e.source == "pipeline.core.durable"] == ["stages.dump"]
    # and stages.dump imports pipeline.core.durable: a circle
    assert any("pipeline.core.durable" in c and "stages.dump" in c for c in circles(edges))
