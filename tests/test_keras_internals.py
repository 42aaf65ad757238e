"""Private Keras/TensorFlow APIs live in one module, and each one still exists."""

import ast
import pathlib

from noisy_keras import _keras_internals

PACKAGE = pathlib.Path(_keras_internals.__file__).parent


def test_every_private_symbol_the_package_relies_on_exists():
    missing = _keras_internals.missing_symbols()
    assert not missing, (
        f"These private Keras/TensorFlow symbols are gone in the installed releases: {missing}. "
        f"noisy_keras._keras_internals was checked on {_keras_internals.CHECKED_ON}; update it."
    )


def _private_uses(path: pathlib.Path) -> list[str]:
    """Imports of keras.src / tensorflow.python, and reads of `_private` attributes of objects
    other than `self`/`cls` and this package's own modules."""
    tree = ast.parse(path.read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("keras.src", "tensorflow.python")):
                uses.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(("keras.src", "tensorflow.python")):
                    uses.append(f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and (
                owner.id in ("self", "cls") or owner.id.startswith("_")
            ):
                continue  # own attributes, or a private module of this package
            if isinstance(owner, ast.Name) and owner.id in _OWN_MODULE_ALIASES:
                continue
            uses.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(("keras.src.", "tensorflow.python.")):
                uses.append(f"line {node.lineno}: {node.value!r}")
    return uses


_OWN_MODULE_ALIASES = {"internals", "noise_lib", "harness", "workloads", "config_lib"}


def test_only_the_internals_module_touches_private_apis():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_keras_internals.py":
            continue
        uses = _private_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE))] = uses
    assert not offenders, offenders


def test_the_internals_module_is_found_by_the_scan():
    """The scan above would see private uses: it finds them in the internals module."""
    uses = _private_uses(PACKAGE / "_keras_internals.py")
    assert any("keras.src" in u for u in uses) and any("._make_function" in u for u in uses)
