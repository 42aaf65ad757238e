"""Test session set-up: two logical CPU devices stand in for two GPUs.

The split must happen before TensorFlow initialises its devices, so it is done
at import time of this file, before any test module imports a model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from noisy_keras import distribute  # noqa: E402

distribute.configure_logical_cpus(2)


@pytest.fixture(autouse=True)
def _clear_keras_session():
    """Each test starts with fresh Keras names and the default float policy."""
    import keras

    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
