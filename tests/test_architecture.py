"""The package's shape: geometry samplers live only in rwcnet.geometry (checked on the source with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rwcnet"
SAMPLERS = {"grid_sample", "map_coordinates", "affine_transform"}


def _called_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_only_the_geometry_package_calls_the_samplers():
    offenders = {
        str(path.relative_to(SRC)): sorted(_called_names(ast.parse(path.read_text())) & SAMPLERS)
        for path in SRC.rglob("*.py") if "geometry" not in path.relative_to(SRC).parts
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    assert _called_names(ast.parse((SRC / "geometry" / "fields.py").read_text())) & SAMPLERS  # the check sees calls


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every rwcnet module's rwcnet imports, wherever they stand (module level, in functions, under TYPE_CHECKING)."""
    modules = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges.update(target for target in targets if target in modules and target != name)
        graph[name] = edges
    return graph


def test_the_static_import_graph_has_no_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 50 and cycles == []


def test_no_source_file_is_over_400_lines():
    lengths = {str(path.relative_to(SRC)): len(path.read_text().splitlines()) for path in SRC.rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > 400} == {}
