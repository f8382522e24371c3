"""The shape docs/DESIGN.md promises, checked over the source: layers import downward only, no import cycle,
the 4-bit format contract free of compilers, short functions, and a Python function behind every command."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "loraq"
TESTS = Path(__file__).resolve().parent

# bottom up; a module may import its own layer and the layers below it (docs/DESIGN.md, "Layers")
GROUND = {"loraq", "errors", "config", "choices", "devices", "paths", "faults", "modules", "outputs"}
LAYERS = [GROUND, {"quant"}, {"kernels"}, {"data"}, {"models"}, {"lora"}, {"generation"}, {"distributed"}, {"training"},
          {"exporting"}, {"planning"}, {"serving"}, {"api"}, {"commands", "cli", "__main__"}]
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("loraq", *path.relative_to(SRC).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def import_edges(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the loraq modules it imports, at module level and inside functions alike."""
    def resolve(name: str) -> str:
        while name not in known:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loraq":
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "loraq"]
            else:
                continue
            edges[module].update(resolve(t) for t in targets if resolve(t) != module)
    return edges


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "loraq"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module}: its package {top!r} has no layer in docs/DESIGN.md (add it to LAYERS)")


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layers_import_downward_only_and_nothing_imports_in_a_circle():
    edges = import_edges(modules())
    assert upward_imports(edges) == []
    assert cycles(edges) == []


def test_the_checks_find_an_upward_import_and_a_cycle():
    """The rule is not vacuous: an import of training from quant is upward, and back again it is a cycle."""
    known = modules()
    edges = import_edges(known)
    edges["loraq.quant.functional"] = edges["loraq.quant.functional"] | {"loraq.training.loop"}
    assert upward_imports(edges) == ["loraq.quant.functional -> loraq.training.loop"]
    assert any("loraq.quant.functional" in c and "loraq.training.loop" in c for c in cycles(edges))


def test_the_4bit_format_contract_needs_no_compiler():
    """quant/ is the format: no ctypes, subprocess, Inductor or torch.compile in it (kernels/ registers those)."""
    banned = re.compile(r"^\s*(import|from)\s+(ctypes|subprocess|torch\._inductor)\b|torch\.compile\(", re.MULTILINE)
    offenders = [str(p.relative_to(SRC)) for p in (SRC / "quant").rglob("*.py") if banned.search(p.read_text())]
    assert offenders == []


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_every_command_has_an_api_function_that_a_test_calls():
    import loraq
    from loraq.api import COMMAND_API
    from loraq.cli import COMMANDS

    assert set(COMMAND_API) == set(COMMANDS)
    test_text = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    for command, function in COMMAND_API.items():
        assert callable(getattr(loraq, function)), command
        assert re.search(rf"\bloraq\.{function}\(", test_text), f"no test calls loraq.{function}(...) ({command})"


def test_no_name_is_both_a_package_and_an_api_function():
    import loraq

    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages & set(loraq._LAZY) == set()
