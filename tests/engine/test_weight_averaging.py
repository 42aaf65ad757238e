"""Weight averaging by Keras' `use_ema`, on the wrapped optimizer, under the engine.

Keras keeps a = w_1 after the first update and a <- m a + (1 - m) w_{t+1} after
each later one, and `fit` ends by writing a into the model
(`finalize_variable_values`, which the noise wrappers delegate to the inner
optimizer). The same run without the average records w_1, ..., w_T, so the
averaged run's final weights are known exactly.
"""

import keras
import numpy as np
import pytest

from noisy_keras import NoisyOptimizer
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.engine.methods import enable_sam

B, UPDATES, MOMENTUM = 8, 6, 0.75


class _Trajectory(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([np.asarray(w, np.float64) for w in self.model.get_weights()])


def _run(use_ema, sam, callbacks=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B * UPDATES, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype(np.float32)
    with make_strategy("mirrored", 2).scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        inner = keras.optimizers.SGD(0.05, momentum=0.9, use_ema=use_ema, ema_momentum=MOMENTUM)
        model.compile(optimizer=NoisyOptimizer(inner, alpha=1e-3, seed=3), loss="mse")
    replica_xla.enable_replica_xla(model)
    if sam:
        enable_sam(model, rho=0.05)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
def test_final_weights_are_the_exponential_average_of_the_trajectory(sam):
    trajectory = _Trajectory()
    raw = _run(use_ema=False, sam=sam, callbacks=[trajectory])
    averaged = _run(use_ema=True, sam=sam)
    assert len(trajectory.weights) == UPDATES
    want = trajectory.weights[0]
    for weights in trajectory.weights[1:]:
        want = [MOMENTUM * a + (1 - MOMENTUM) * w for a, w in zip(want, weights)]
    got = [np.asarray(w, np.float64) for w in averaged.get_weights()]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    last = trajectory.weights[-1]
    assert max(np.max(np.abs(g - w)) for g, w in zip(got, last)) > 1e-3  # not the last weights
    assert [np.asarray(w).tolist() for w in raw.get_weights()] == [w.tolist() for w in last]


def test_resume_restores_the_average_and_the_method(tmp_path):
    """A run resumed from its epoch-1 checkpoint ends with the uninterrupted run's average."""
    from noisy_keras.data.epochs import epoch_batches
    from noisy_keras.engine import fit as training

    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype(np.float32)

    def build():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        inner = keras.optimizers.SGD(0.05, momentum=0.9, use_ema=True, ema_momentum=MOMENTUM)
        model.compile(optimizer=NoisyOptimizer(inner, alpha=1e-3, seed=3), loss="mse")
        return enable_sam(model, rho=0.05)

    def run(epochs, workdir):
        result = training.fit(
            build,
            epoch_batches((x, y), batch_size=B, seed=0),
            epochs=epochs,
            steps_per_epoch=4,
            workdir=str(workdir),
            verbose=0,
        )
        assert result.status == "done"
        return [np.asarray(w) for w in result.model.get_weights()]

    whole = run(2, tmp_path / "whole")
    first = run(1, tmp_path / "resumed")
    keras.utils.clear_session()
    resumed = run(2, tmp_path / "resumed")  # a new model, restored at epoch 1
    for a, b in zip(whole, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(np.max(np.abs(a - b)) for a, b in zip(whole, first)) > 1e-4
