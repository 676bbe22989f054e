"""The engine sits below analysis: no module of it imports from ``mimkit.analysis``, at module or function level."""

from __future__ import annotations

import ast
from pathlib import Path

import mimkit.engine.previews

ENGINE = Path(mimkit.engine.previews.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_imports_nothing_from_analysis() -> None:
    files = sorted(ENGINE.glob("*.py"))
    assert {path.name for path in files} >= {"previews.py", "reconstruction.py", "run.py"}
    upward = {path.name: sorted(m for m in imported_modules(path) if m.startswith("mimkit.analysis")) for path in files}
    assert not any(upward.values()), upward
    # the pictures the loop draws come from the engine's own module
    assert "mimkit.engine.reconstruction" in imported_modules(ENGINE / "previews.py")
