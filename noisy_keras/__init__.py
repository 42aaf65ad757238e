"""noisy_keras: large mini-batch training that generalizes, for Keras 3 / TensorFlow.

Linear learning-rate scaling plus annealed Gaussian noise added to every
mini-batch gradient, sigma_t^2 = alpha / (1 + t)^gamma (Jaiswal & Taura,
"Overcoming Generalization Gap in Large Mini-Batch Training of Deep Neural
Networks"), with the methods it builds on and the tools to measure the effect.

`import noisy_keras` imports Keras (and TensorFlow) and the public names below,
each from the module that defines it; the Keras-serializable classes register
themselves there (`keras.saving.register_keras_serializable`), so a `.keras`
file written with them loads with `keras.models.load_model` once
`noisy_keras` is imported, in whichever order the two imports come.

The package needs Keras' TensorFlow backend: under another one the import
raises ImportError saying so. When the package is imported by one of its own
command lines (`python -m noisy_keras.train`, `noisy-keras-train`, ...),
TensorFlow's C++ start-up lines are silenced (`noisy_keras.run._cli`), a wrong
backend ends the process with a one-line error and exit status 2, and a help
request (`--help`) imports neither Keras nor the API: it needs only the flags.
"""

import os
import sys

__version__ = "0.1.0"

_COMMAND_LINE_SCRIPTS = ("noisy-keras-train", "noisy-keras-experiments", "noisy-keras-bench")


def _started_as_command_line() -> bool:
    """Whether this import is the start of one of the package's command lines.

    While `python -m noisy_keras.X` locates its module, Python imports the
    parent package with `sys.argv[0] == "-m"` (documented in "Command line and
    environment"); the console scripts carry their own names.
    """
    first = sys.argv[0] if getattr(sys, "argv", None) else ""
    script = os.path.splitext(os.path.basename(first))[0]  # noisy-keras-train(.exe)
    return first == "-m" or script in _COMMAND_LINE_SCRIPTS


def _refuse(message: str, cause: BaseException | None = None) -> None:
    if _started_as_command_line():  # nothing has been read or written yet
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message) from cause


def _import_keras_with_tensorflow() -> None:
    """Imports Keras (quietly for the command lines); refuses any backend but TensorFlow."""
    advice = "noisy_keras needs the TensorFlow backend of Keras 3; KERAS_BACKEND is"
    try:
        if _started_as_command_line():
            from noisy_keras.run import _cli

            _cli.quiet_tensorflow()
        import keras
    except ImportError as error:
        requested = os.environ.get("KERAS_BACKEND", "tensorflow")
        if requested == "tensorflow":
            raise
        _refuse(
            f"{advice} {requested!r}, which Keras could not load ({error}). "
            "Set KERAS_BACKEND=tensorflow.",
            error,
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        _refuse(f"{advice} {backend!r}. Set KERAS_BACKEND=tensorflow.")


def _help_requested() -> bool:
    """A command line asked only for its help, which needs neither Keras nor TensorFlow."""
    from noisy_keras.run import _cli

    return _started_as_command_line() and _cli.help_requested(sys.argv)


if not _help_requested():
    _import_keras_with_tensorflow()
    # The public API, imported from the modules that define it.
    from noisy_keras.engine.methods import (
        disable_gradient_method,
        enable_gradient_norm_penalty,
        enable_sam,
    )
    from noisy_keras.models.layers import GhostBatchNormalization
    from noisy_keras.models.losses import SmoothedSparseCategoricalCrossentropy
    from noisy_keras.models.zoo import build_model
    from noisy_keras.noise.callbacks import NoiseLogger
    from noisy_keras.noise.chain import current_noise_stddev, find_noisy_optimizer
    from noisy_keras.noise.draw import unit_noise
    from noisy_keras.noise.matched import MatchedNoiseOptimizer
    from noisy_keras.noise.multiplicative import enable_multiplicative_noise
    from noisy_keras.noise.optimizer import NoisyOptimizer
    from noisy_keras.noise.schedules import PAPER_ALPHA, PAPER_GAMMA, noise_stddev, noise_variance
    from noisy_keras.noise.temperature import temperature_deficit
    from noisy_keras.optim.lars import LARS
    from noisy_keras.optim.lr import scale_learning_rate
    from noisy_keras.optim.schedule import WarmupStepDecay, paper_schedule
    from noisy_keras.optim.sharpness import SAM, GradientNormPenalty

__all__ = [
    "GhostBatchNormalization",
    "GradientNormPenalty",
    "LARS",
    "MatchedNoiseOptimizer",
    "NoiseLogger",
    "NoisyOptimizer",
    "PAPER_ALPHA",
    "PAPER_GAMMA",
    "SAM",
    "SmoothedSparseCategoricalCrossentropy",
    "WarmupStepDecay",
    "build_model",
    "current_noise_stddev",
    "disable_gradient_method",
    "enable_gradient_norm_penalty",
    "enable_multiplicative_noise",
    "enable_sam",
    "find_noisy_optimizer",
    "noise_stddev",
    "noise_variance",
    "paper_schedule",
    "scale_learning_rate",
    "temperature_deficit",
    "unit_noise",
]
