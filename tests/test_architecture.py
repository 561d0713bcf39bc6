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
