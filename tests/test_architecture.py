"""The package's shape: no import circles, and no package importing one above it.

Walks every `import` and `from ... import` of every module (TYPE_CHECKING blocks
and imports inside functions included), resolves each to a module of the package
and checks the edges against the layers below: a module may import modules of
its own package and of packages in lower layers, never of a higher one.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "noisy_keras")

# Lowest first. The top-level `noisy_keras` (the public API) and the two command
# shims (`python -m noisy_keras.train`, `... .experiments`) sit above everything.
LAYERS = (
    ("_validation", "_extras", "_keras_internals", "_structures", "install"),
    ("optim",),
    ("models",),
    ("noise",),
    ("data",),
    ("engine",),
    ("analysis",),
    ("run",),
    ("study",),
    ("bench",),
    ("__init__", "train", "experiments"),
)


def _modules() -> dict[str, str]:
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules) -> str:
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(path: str, modules) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute ones)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("noisy_keras"):
            found |= {_resolve(f"{node.module}.{alias.name}", modules) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {
                _resolve(alias.name, modules)
                for alias in node.names
                if alias.name.split(".")[0] == "noisy_keras"
            }
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name, "noisy_keras"} for name, path in modules.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(LAYERS):
        if part in names:
            return level
    raise AssertionError(f"{module} is in no layer; add its package to LAYERS")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_walk_sees_the_imports_it_must():
    graph = _graph()
    assert "noisy_keras.noise.optimizer" in graph["noisy_keras"]  # the public API
    assert "noisy_keras.noise.multiplicative" in graph["noisy_keras.engine.steps"]
    assert "noisy_keras.run.config" in graph["noisy_keras.study.grid"]
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(cyclic) == [["a", "b", "c"]]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_no_package_imports_one_above_it():
    upward = {
        (module, imported)
        for module, imports in _graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    }
    assert upward == set()


@pytest.mark.parametrize("package", ["data", "engine", "models", "noise", "optim"])
def test_registries_hold_names_and_import_nothing(package):
    """`run.config` reads the names from them without importing TensorFlow."""
    tree = ast.parse(open(os.path.join(PACKAGE, package, "registry.py")).read())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == []


def test_the_module_map_of_the_docs_names_every_module():
    """docs/development.md "Architecture": a row per module of the core packages, one per other."""
    readme = open(os.path.join(os.path.dirname(PACKAGE), "docs", "development.md")).read()
    start = readme.index("## Architecture")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else len(readme)]
    shims = ("noisy_keras.train", "noisy_keras.experiments")  # described in the text below it
    missing = []
    for name, path in _modules().items():
        if path.endswith("__init__.py") or name in shims:
            continue
        parts = name.split(".")[1:]
        if parts[0] in ("analysis", "bench"):
            row = f"| `{parts[0]}/` |"
        else:
            row = f"| `{'.'.join(parts)}` |"
        if row not in section:
            missing.append(row)
    assert missing == []
