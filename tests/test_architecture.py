"""The layer diagram of docs/architecture.md, enforced on the source: no package imports one above it and no
module-level import cycle exists, counting imports inside functions (only ``if TYPE_CHECKING:`` imports, which
never run, are left out). The imports that still break the rule are listed by name below; the list may only
shrink, and the test fails when one of them is gone so that it is struck from the list."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom first: a package may import the packages before it, never one after it.
LAYERS = (
    "files",
    "layers",
    "data",
    "masking",
    "models",
    "checkpoints",
    "targets",
    "config",
    "build",
    "engine",
    "eval",
    "analysis",
    "dense",
    "tasks",
    "bench",
    "cli",
)
TOP = {"__init__", "__main__", "cli"}  # the package's entry points sit above everything

# importer module -> imported module: the upward imports not yet removed (docs/architecture.md says where each
# one's code is to move)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def package_of(module: str) -> str:
    """``mimkit.models.vit`` -> ``models``; ``mimkit.cli`` -> ``cli``; ``mimkit.build`` -> ``build``;
    ``mimkit`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(package: str) -> int:
    return len(LAYERS) if package in TOP else LAYERS.index(package)


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, root: Path = SRC) -> Iterator[str]:
    """The mimkit modules ``path`` imports when it runs (module level and inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("mimkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mimkit"):
                yield target


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / "mimkit").rglob("*.py")):
        graph[module_name(path)] = set(runtime_imports(path))
    return graph


def test_no_package_imports_a_package_above_it() -> None:
    upward = {
        (source, target)
        for source, targets in import_graph().items()
        for target in targets
        if rank(package_of(target)) > rank(package_of(source))
    }
    new = sorted(upward - KNOWN_UPWARD)
    gone = sorted(KNOWN_UPWARD - upward)
    assert not new, f"upward imports (see docs/architecture.md): {new}"
    assert not gone, f"these upward imports are gone: strike them from KNOWN_UPWARD: {gone}"


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_ones(tmp_path: Path) -> None:
    module = tmp_path / "mimkit" / "models" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from mimkit.layers import Block\n"
        "if TYPE_CHECKING:\n"
        "    from mimkit.config import Config\n"
        "def build():\n"
        "    from mimkit.engine.rng import rng_state\n"
        "    from ..targets import pixel\n"
        "    import mimkit.data.folder\n"
    )
    found = set(runtime_imports(module, root=tmp_path))
    assert found == {"mimkit.layers", "mimkit.engine.rng", "mimkit.targets", "mimkit.data.folder"}
    assert rank("layers") < rank("models") < rank("engine") < rank("cli") == rank("__init__")
    assert package_of("mimkit.build") == "build" and rank("targets") < rank("config") < rank("build") < rank("engine")


# Inside a package split into layers of its own, bottom first: a module imports the layers before its own,
# never one after it; the package's ``__init__`` re-exports and sits above them all.
SUBLAYERS = {
    "bench": ("timing", "contenders", "peers", "costs", "memory", "pipeline", "run"),
    "dense": ("data", "models", "evaluation"),
    "config": ("loader", "pretrain"),
}


def sublayer_rank(module: str) -> int:
    """``mimkit.dense.models.upernet`` -> the rank of ``models`` in ``SUBLAYERS["dense"]``."""
    parts = module.split(".")
    order = SUBLAYERS[parts[1]]
    if len(parts) == 2:
        return len(order)
    assert parts[2] in order, f"{module} is in no layer of SUBLAYERS[{parts[1]!r}]: place it there"
    return order.index(parts[2])


def test_layered_packages_import_no_layer_above_their_own() -> None:
    graph = import_graph()
    for module in graph:
        if package_of(module) in SUBLAYERS:
            sublayer_rank(module)  # every module sits in a layer
    upward = sorted(
        (source, target)
        for source, targets in graph.items()
        if package_of(source) in SUBLAYERS
        for target in targets
        if package_of(target) == package_of(source) and sublayer_rank(target) > sublayer_rank(source)
    )
    assert not upward, f"upward imports inside a layered package (see docs/architecture.md): {upward}"
