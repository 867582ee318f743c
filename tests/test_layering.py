"""The import graph of lowbit/: no cycles between modules, and every module imports only from its
own package or from a lower layer (DESIGN.md: core <- nn <- models <- algorithms <- cli)."""

import ast
from pathlib import Path

LOWBIT = Path(__file__).resolve().parents[1] / "lowbit"
# Lower number = lower layer. A module may import its own package and any lower layer, never a
# sibling of the same layer or a higher one.
LAYERS = {
    "files": 0, "core": 1, "kernels": 2, "nn": 3, "models": 4, "data": 5, "kvcache": 5, "eval": 6,
    "ptq": 7, "decode": 7, "train": 7, "checkpoint": 8, "export": 9, "sweep": 9, "cli": 10, "__init__": 11,
}


def _imports() -> dict[str, set[str]]:
    """Module name -> the lowbit modules it imports anywhere in its body (function-level too)."""
    graph = {}
    for path in LOWBIT.rglob("*.py"):
        name = ".".join(path.relative_to(LOWBIT.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "lowbit":
                found |= {f"lowbit.{alias.name}" for alias in node.names}  # from lowbit import checkpoint
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowbit"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("lowbit")}
        graph[name] = found
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    packages = {_package(module) for module in _imports()}
    assert packages <= set(LAYERS), f"give {sorted(packages - set(LAYERS))} a layer in LAYERS"


def test_no_module_imports_a_sibling_or_higher_layer():
    wrong = sorted(f"{module} imports {target}" for module, targets in _imports().items()
                   for target in targets if _package(target) != _package(module)
                   and LAYERS[_package(target)] >= LAYERS[_package(module)])
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _imports()

    def resolve(target):  # `from lowbit.nn import X` is the package's __init__, `lowbit.nn.rules` a module
        while target and target not in graph:
            target = target.rpartition(".")[0]
        return target

    edges = {module: {resolve(t) for t in targets if resolve(t) and resolve(t) != module
                      and not module.startswith(resolve(t) + ".")}
             for module, targets in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in edges.get(module, ()):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, cycles
