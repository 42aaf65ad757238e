"""Optional dependencies: each belongs to an extra, and is imported where a feature needs it.

The core install (`pip install noisy_keras`) is the five packages the project is
built on; the rest comes with extras declared in setup.cfg:

* `[analysis]`: matplotlib and scipy (figures, statistics, sharpness);
* `[study]`: the analysis packages and mnist1d (the experiment runner, reports,
  the mnist1d data set);
* `[test]`, `[all]`.

`require(module, feature, extra)` imports an optional module, or raises
`MissingExtraError`, an ImportError whose one-line message names the feature,
the missing package and the extra to install. `import noisy_keras` never needs
an extra.
"""

from __future__ import annotations

import importlib
import types

__all__ = ["EXTRA_OF", "MissingExtraError", "require"]

EXTRA_OF = {
    # importable name: (package on PyPI, the extra that installs it)
    "matplotlib": ("matplotlib", "analysis"),
    "scipy": ("scipy", "analysis"),
    "mnist1d": ("mnist1d", "study"),
}
"""Every optional dependency the package imports, with its distribution and extra."""


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed."""


def _top_level(module: str) -> str:
    top = module.split(".", 1)[0]
    if top not in EXTRA_OF:
        raise ValueError(
            f"module={module!r} is not an optional dependency; known: {', '.join(EXTRA_OF)}."
        )
    return top


def require(module: str, feature: str, extra: str | None = None) -> types.ModuleType:
    """Imports `module` (e.g. "scipy.stats") for `feature`, or names the extra to install.

    Args:
        module: an optional module, or a module inside one of `EXTRA_OF`'s packages.
        feature: what needs it, as the user knows it (a module, a flag value).
        extra: the extra to name when missing (default: the package's own, `EXTRA_OF`);
            a feature that needs several extras' packages names the one that has them all.

    Raises:
        MissingExtraError: the module's package is not installed; the message is one
            line: what needs it, the package, and `pip install "noisy_keras[EXTRA]"`.
        ValueError: `module` is not one of `EXTRA_OF`'s.
    """
    top = _top_level(module)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".", 1)[0] != top:
            raise  # the package is there but something it imports is broken: show that
        package, own_extra = EXTRA_OF[top]
        extra = extra or own_extra
        raise MissingExtraError(
            f'{feature} needs {package}, which is not installed: pip install "noisy_keras[{extra}]"'
        ) from error
