"""Count the non-blank, non-docstring, non-comment source lines of src/ (for the architecture notes).

Usage: python benchmarks/source_lines.py [SRC_DIR]   (default: src next to this script)
Prints the total and the ten largest files.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def docstring_lines(tree: ast.Module) -> set[int]:
    """Line numbers (1-based) covered by module, class and function docstrings."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(path: Path) -> int:
    """Lines holding at least one code token that is not part of a docstring."""
    text = path.read_text()
    skip = docstring_lines(ast.parse(text))
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENDMARKER, tokenize.ENCODING}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in ignored:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in skip)
    return len(lines)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src"
    counts = {path: code_lines(path) for path in sorted(root.rglob("*.py"))}
    print(f"{sum(counts.values())} code lines in {len(counts)} files under {root}")
    for path, count in sorted(counts.items(), key=lambda item: -item[1])[:10]:
        print(f"  {count:5d}  {path.relative_to(root)}")


if __name__ == "__main__":
    main()
