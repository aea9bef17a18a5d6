"""The import arrows between rnndsl's modules, read from their source (nothing is imported).

Layers, bottom up: names and errors; the IR and its tables; the front end; lowering; the
passes; code generation. None of these imports torch or a runtime module at module level,
so the compiler (text -> source) can be read and run without them. Everything else
(cellspec and what grows out of it, the runtime half of the backward, networks,
containers, native*, kernels, scan, linear_scan, cli) is the runtime, the top layer.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rnndsl"

# Compiler groups, and the groups each may import from (its own included).
GROUPS: Dict[str, Set[str]] = {
    "names": {"rnndsl.names"},
    "base": {"rnndsl.errors", "rnndsl.resources", "rnndsl.options"},
    "ir": {"rnndsl.ir", "rnndsl.ops", "rnndsl.spec", "rnndsl.dependency", "rnndsl.dot"},
    "front": {"rnndsl.syntax_tree", "rnndsl.syntax", "rnndsl.check"},
    "lower": {"rnndsl.lower"},
}
ALLOWED = {
    "names": {"names"},
    "base": {"base"},
    "ir": {"base", "ir"},
    "front": {"base", "ir", "front"},
    "lower": {"base", "ir", "front", "names", "lower"},
    "passes": {"base", "ir", "names", "passes"},
    "codegen": {"base", "ir", "names", "codegen"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str:
    """A module's compiler group, or "runtime"."""
    for prefix in ("passes", "codegen"):
        if module == f"rnndsl.{prefix}" or module.startswith(f"rnndsl.{prefix}."):
            return prefix
    return next((group for group, members in GROUPS.items() if module in members), "runtime")


def _imports(path: Path) -> List[Tuple[str, int, bool]]:
    """``(module, line, at module level)`` for every import in ``path``, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` imports are for annotations only: never run, no arrow.
    for_annotations = {id(inner) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
                       for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in for_annotations:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            # `from . import x` and `from .codegen import base` may name modules.
            names = [f"{target}.{alias.name}" for alias in node.names]
            modules = [name for name in names if _exists(name)] or [target]
            found += [(name, node.lineno, id(node) in top_level) for name in modules]
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
COMPILER = sorted(name for name in MODULES if _group(name) != "runtime")


@pytest.mark.parametrize("module", COMPILER)
def test_the_compiler_imports_no_torch_and_no_runtime_at_module_level(module):
    for target, line, top in _imports(MODULES[module]):
        if not top:
            continue
        assert target.split(".")[0] != "torch", f"{module}:{line} imports {target}"
        if target.startswith("rnndsl"):
            group = _group(target)
            assert group in ALLOWED[_group(module)], \
                f"{module}:{line} imports {target} ({group}), outside what {_group(module)} may import"


def test_names_imports_nothing_from_rnndsl():
    assert not [target for target, _, _ in _imports(MODULES["rnndsl.names"]) if target.startswith("rnndsl")]


def test_no_sibling_target_imports_another_targets_private_names():
    for module in (name for name in COMPILER if _group(name) == "codegen"):
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{module}:{node.lineno} imports private {private}"


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """A cycle in ``graph`` (module -> modules it imports), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _import_graph(include_function_level: bool) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for module, path in MODULES.items():
        graph[module] = {target for target, _, top in _imports(path)
                         if target in MODULES and target != module and (top or include_function_level)}
    return graph


def test_no_import_cycles_among_module_level_imports():
    assert _cycle(_import_graph(include_function_level=False)) == []


# The one inherent edge: a pickled cell rebuilds itself through the compiler (cells.py's
# unpickling imports cellspec.load_source inside a function, saying why).
INHERENT_EDGES = {("rnndsl.cells", "rnndsl.cellspec")}


def test_no_import_cycles_even_through_function_level_imports():
    graph = _import_graph(include_function_level=True)
    for module, target in INHERENT_EDGES:
        graph[module].discard(target)
    assert _cycle(graph) == []


@pytest.mark.parametrize("module", list(MODULES))
def test_a_function_level_import_says_why(module):
    path = MODULES[module]
    lines = path.read_text(encoding="utf-8").splitlines()
    for target, line, top in _imports(path):
        if not top:
            assert "#" in lines[line - 1] or lines[line - 2].strip().startswith("#"), \
                f"{module}:{line} imports {target} inside a function without a comment saying why"
