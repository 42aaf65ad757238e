"""Test session set-up: two logical CPU devices stand in for two GPUs.

The split must happen before TensorFlow initialises its devices, so it is done
at import time of this file, before any test module imports a model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from noisy_keras.engine import distribute  # noqa: E402

distribute.configure_logical_cpus(2)


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Each test starts with fresh Keras names, the default float policy and op determinism off.

    `noisy_keras.train` turns TensorFlow's op determinism on for the process (as a
    run should); Keras then silently disables `jit_compile`, which would change what
    later tests exercise, so it is switched off again after every test.
    """
    import keras

    from noisy_keras import _keras_internals

    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
    if _keras_internals.is_op_determinism_enabled():
        _keras_internals.disable_op_determinism()


@pytest.fixture()
def flag_values():
    """The main job's absl flags, defined once, parsed per test and reset after."""
    from absl import flags

    from noisy_keras.run import train

    train.define_flags()
    yield flags.FLAGS
    flags.FLAGS.unparse_flags()
