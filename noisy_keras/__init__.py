"""noisy_keras: large mini-batch training that generalizes, for Keras 3 / TensorFlow.

Linear learning-rate scaling plus annealed Gaussian noise added to every
mini-batch gradient, sigma_t^2 = alpha / (1 + t)^gamma (Jaiswal & Taura,
"Overcoming Generalization Gap in Large Mini-Batch Training of Deep Neural
Networks"), with the methods it builds on and the tools to measure the effect.

Importing the package is cheap: the public names below are imported from their
modules on first use (PEP 562), so the command lines print their help without
loading TensorFlow. The package's Keras-serializable classes are registered as
soon as Keras is imported, in whichever order the two imports come, so a
`model.keras` written by a run loads after `import noisy_keras` alone.
"""

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_EXPORTS = {
    # public name: module of the package that defines it
    "GhostBatchNormalization": "layers",
    "LARS": "lars",
    "MatchedNoiseOptimizer": "matched_noise",
    "NoisyOptimizer": "optimizer",
    "PAPER_ALPHA": "noise",
    "PAPER_GAMMA": "noise",
    "SmoothedSparseCategoricalCrossentropy": "losses",
    "WarmupStepDecay": "lr",
    "build_model": "models",
    "current_noise_stddev": "optimizer",
    "enable_multiplicative_noise": "multiplicative",
    "find_noisy_optimizer": "optimizer",
    "noise_stddev": "noise",
    "noise_variance": "noise",
    "paper_schedule": "lr",
    "scale_learning_rate": "lr",
    "temperature_deficit": "temperature",
    "unit_noise": "noise",
}
"""Public names, each imported from its module on first access. Add new ones here."""

_KERAS_REGISTRANTS = ("layers", "lr", "models", "optimizer", "lars", "matched_noise", "losses")
"""Modules whose import registers Keras-serializable classes; imported right after Keras."""

__all__ = sorted(_EXPORTS)

_backend_error = None  # set when Keras runs another backend than TensorFlow


def _check_backend() -> None:
    if _backend_error is not None:
        raise ImportError(_backend_error)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. `lr`
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        defining_module = importlib.import_module(f"{__name__}.{module}")
    except Exception:
        _check_backend()  # a wrong Keras backend explains the failure best
        raise
    _check_backend()
    value = getattr(defining_module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _register_keras_classes() -> None:
    """Imports the modules that register Keras classes (Keras is imported by now)."""
    global _backend_error
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        # Keras itself must keep working; noisy_keras refuses when it is used.
        _backend_error = (
            "noisy_keras needs the TensorFlow backend of Keras 3; KERAS_BACKEND is "
            f"{backend!r}. Set KERAS_BACKEND=tensorflow."
        )
        return
    for module in _KERAS_REGISTRANTS:
        importlib.import_module(f"{__name__}.{module}")


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when `keras` is imported, register our classes right after.

    It finds nothing itself. For `keras` it takes itself off `sys.meta_path`,
    asks the remaining finders for the real spec and wraps its loader so that
    `_register_keras_classes` runs once Keras' own module has executed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            sys.meta_path.insert(0, self)  # not importable now; try again next time
            return spec
        spec.loader = _LoaderThenRegister(spec.loader, self)
        return spec


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        except BaseException:
            sys.meta_path.insert(0, self._finder)  # keras failed to import; register next time
            raise
        _register_keras_classes()


if "keras" in sys.modules:
    _register_keras_classes()
else:
    sys.meta_path.insert(0, _RegisterAfterKeras())
