"""The project's import graph (every `import` in every .py file, function-level ones included): no circle, and no
arrow from a floor to one above it.

Floors, lowest first; a module may import its own floor and those below:

    ground      common/                                     errors, atomic output folders, saved models, plugins
    models      configuration_vla, modeling_*, model_kinds  the model code (copied into saved folders) and its registry
    data        data_prep/                                  tasks, simulators, experts, generation, datasets
    evaluation  evaluation/                                 dreams and real roll-outs, their reports
    apps        hub_cards/, train_accelerate, pipeline, space_app/
    benchmarks  benchmarks/

The model code files travel into saved model folders (trust_remote_code), so they import nothing else of the project.
Plugins (`VLA_PLUGINS`, common/plugins.py) are imported by name, the one import this graph cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOORS = (
    ("ground", ("common",)),
    ("models", ("configuration_vla", "modeling_*", "model_kinds")),
    ("data", ("data_prep",)),
    ("evaluation", ("evaluation",)),
    ("apps", ("hub_cards", "train_accelerate", "pipeline", "space_app")),
    ("benchmarks", ("benchmarks",)),
)
MODEL_CODE = ("configuration_vla", "modeling_*")  # copied next to the weights: self-contained
SKIPPED = {".venv", "tests", "scripts", "build", "runs", "docs"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for p in REPO.rglob("*.py") if not SKIPPED & set(p.relative_to(REPO).parts)]
    return {module_name(p): p for p in files}


def matches(name: str, pattern: str) -> bool:
    top = name.split(".")[0]
    return top.startswith(pattern[:-1]) if pattern.endswith("*") else top == pattern


def floor_of(name: str) -> int:
    for index, (_, patterns) in enumerate(FLOORS):
        if any(matches(name, p) for p in patterns):
            return index
    raise AssertionError(f"{name}: on no floor; add it to FLOORS in {Path(__file__).name}")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (resolved to the longest known module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the model code's `from .x import y` names its sibling x
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                module = ".".join([*filter(None, base), node.module or ""]).strip(".")
            else:
                module = node.module or ""
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            known = [m for m in modules if target == m or target.startswith(f"{m}.")]
            if known:
                found.add(max(known, key=len))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle() -> None:
    assert cycle_in(graph()) is None, f"import circle: {' -> '.join(cycle_in(graph()))}"


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = [f"{a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if floor_of(b) > floor_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_model_code_imports_only_model_code() -> None:
    """What save_pretrained copies into a model folder must load there without the project."""
    strays = [f"{a} imports {b}" for a, targets in graph().items() if any(matches(a, p) for p in MODEL_CODE)
              for b in sorted(targets) if not any(matches(b, p) for p in MODEL_CODE)]
    assert not strays, "\n".join(strays)


def test_the_checks_see_a_circle_and_an_upward_arrow() -> None:
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
    assert floor_of("data_prep.generate") > floor_of("model_kinds") > floor_of("common.errors")
    assert floor_of("modeling_world") == floor_of("configuration_vla")
    modules = project_modules()
    assert "evaluation.cli" in modules and "common.errors" in graph()["evaluation.cli"]
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("somewhere_new")
