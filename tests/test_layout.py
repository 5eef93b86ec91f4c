"""The package's layout: imports point only down, and front-ends never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import cold

PACKAGE = Path(cold.__file__).parent

# Core layers, lowest first: a module may import its own layer and the layers before it.
CORE = ["errors", "params", "types", "load", "lora", "sampling", "runner", "decoding"]
# Front-ends import the core; besides it, each may import only the front-ends named here.
FRONT_ENDS = {
    "tasks": set(),
    "vllm": set(),
    "llamacpp": set(),
    "evaluation": {"tasks"},
    "training": {"tasks"},
    "bench": {"tasks", "llamacpp"},
    "serve": {"vllm"},
    "lm_eval": set(),
    "hf": set(),
    "cli": {"tasks", "vllm", "llamacpp", "evaluation", "training", "bench", "serve", "lm_eval"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the cold modules it imports anywhere (module level or inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "cold":
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from cold.x import y` may import module y
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "cold")
        graph[name] = found
    return {name: {m for m in found if m in graph and m != name} for name, found in graph.items()}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_module_belongs_to_a_known_layer():
    unknown = {m for m in _imports() if m != "cold" and _top(m) not in CORE and _top(m) not in FRONT_ENDS}
    assert not unknown


def test_core_imports_point_only_down():
    wrong = []
    for module, imported in _imports().items():
        if _top(module) in CORE:
            for target in imported:
                if _top(target) not in CORE or CORE.index(_top(target)) > CORE.index(_top(module)):
                    wrong.append((module, target))
    assert not wrong


def test_front_ends_import_the_core_and_never_another_front_end_unless_below_it():
    wrong = []
    for module, imported in _imports().items():
        top = _top(module)
        if top in FRONT_ENDS:
            for target in imported:
                other = _top(target)
                if other in FRONT_ENDS and other != top and other not in FRONT_ENDS[top]:
                    wrong.append((module, target))
    assert not wrong


def test_no_import_circle():
    graph = _imports()
    # a package's __init__ is imported by each of its modules, so it may not import them back
    done, on_path, circles = set(), [], []

    def visit(module):
        if module in on_path:
            circles.append(on_path[on_path.index(module):] + [module])
            return
        if module in done:
            return
        on_path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not circles


def _readme_layout() -> str:
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_layout_map_names_every_module_and_only_modules_that_exist():
    import re

    block = _readme_layout()
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    named = set(re.findall(r"\b(\w+\.py)\b", block)) - {"vllm_throughput.py", "__init__.py"}  # a script
    assert modules - named == set(), "modules missing from the README's layout map"
    assert named - modules == set(), "the README's layout map names modules that do not exist"
    assert {p for p in packages if f"{p}/" not in block} == set()
