"""The package's rooms follow the pipeline: no import circle, and no module imports from a later
stage. Imports under ``if TYPE_CHECKING:`` are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import smpq_edge

PACKAGE = Path(smpq_edge.__file__).resolve().parent
# The rooms in pipeline order: a module may import from its own room and the rooms before it.
ROOMS = ["common", "tflite", "inputs", "network", "search", "export", "emulator", "firmware", "report",
         "stages", "api", "cli", "__main__", "__init__"]


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports at run time (anywhere in the file, functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
                   for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smpq_edge."):
            base = node.module.removeprefix("smpq_edge.")
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
            found.add(base)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("smpq_edge.") for alias in node.names
                      if alias.name.startswith("smpq_edge.")}
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    names = _module_names()
    return {name: _imports(path, set(names)) - {name} for name, path in names.items()}


def _room(module: str) -> int:
    return ROOMS.index(module.split(".")[0])


def test_every_module_is_in_a_room():
    assert [name for name in _module_names() if name.split(".")[0] not in ROOMS] == []


def test_no_module_imports_from_a_later_stage():
    upward = [f"{module} -> {target}" for module, targets in _graph().items() for target in targets
              if _room(target) > _room(module)]
    assert upward == []


def test_there_is_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
