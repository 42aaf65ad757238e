"""noisy_keras: large mini-batch training that generalizes, for Keras 3 / TensorFlow.

Linear learning-rate scaling plus annealed Gaussian noise added to every
mini-batch gradient, sigma_t^2 = alpha / (1 + t)^gamma (Jaiswal & Taura,
"Overcoming Generalization Gap in Large Mini-Batch Training of Deep Neural
Networks"), with the methods it builds on and the tools to measure the effect.
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "noisy_keras needs the TensorFlow backend of Keras 3; KERAS_BACKEND is "
        f"{_keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
    )

# Importing these modules also registers their Keras-serializable classes, so a
# `model.keras` written by a run loads after a plain `import noisy_keras`.
from noisy_keras.lars import LARS
from noisy_keras.layers import GhostBatchNormalization
from noisy_keras.losses import SmoothedSparseCategoricalCrossentropy
from noisy_keras.lr import WarmupStepDecay, paper_schedule, scale_learning_rate
from noisy_keras.matched_noise import MatchedNoiseOptimizer
from noisy_keras.models import build_model
from noisy_keras.multiplicative import enable_multiplicative_noise
from noisy_keras.noise import PAPER_ALPHA, PAPER_GAMMA, noise_stddev, noise_variance, unit_noise
from noisy_keras.optimizer import NoisyOptimizer
from noisy_keras.temperature import temperature_deficit

__version__ = "0.1.0"

__all__ = [
    "PAPER_ALPHA",
    "PAPER_GAMMA",
    "LARS",
    "GhostBatchNormalization",
    "MatchedNoiseOptimizer",
    "NoisyOptimizer",
    "SmoothedSparseCategoricalCrossentropy",
    "WarmupStepDecay",
    "build_model",
    "enable_multiplicative_noise",
    "noise_stddev",
    "noise_variance",
    "paper_schedule",
    "scale_learning_rate",
    "temperature_deficit",
    "unit_noise",
]
