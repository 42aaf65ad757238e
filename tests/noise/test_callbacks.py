"""NoiseLogger: sigma_t, t, tr(Sigma), s^2 and the gap in Keras' epoch logs and TensorBoard."""

import os

import keras
import numpy as np
import pytest
from tensorboard_events import read_scalars

from noisy_keras import MatchedNoiseOptimizer, NoiseLogger, NoisyOptimizer
from noisy_keras.noise import callbacks as callbacks_lib
from noisy_keras.noise.multiplicative import enable_multiplicative_noise

ALPHA, GAMMA = 1e-2, 0.55
UPDATES_PER_EPOCH = 4  # 64 examples, batches of 16


def _data(seed=0, n=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, size=n)


def _classifier(optimizer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _sigma(step):
    return float(np.sqrt(ALPHA / (1.0 + step) ** GAMMA))


class _Probe(keras.callbacks.Callback):
    """Records each epoch's logs as the callback after the logger sees them."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((epoch, dict(logs)))


def test_epoch_logs_hold_the_last_updates_sigma_step_and_the_gap_for_every_later_callback(
    tmp_path,
):
    x, y = _data()
    model = _classifier(NoisyOptimizer(keras.optimizers.SGD(0.1), ALPHA, GAMMA, seed=2))
    probe = _Probe()
    csv_path = str(tmp_path / "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        validation_data=_data(seed=1, n=32),
        shuffle=False,
        verbose=0,
        callbacks=[NoiseLogger(), probe, keras.callbacks.CSVLogger(csv_path)],
    )
    for epoch, logs in probe.epochs:
        step = (epoch + 1) * UPDATES_PER_EPOCH - 1  # the epoch's last update
        assert logs["noise_step"] == step
        assert logs["noise_stddev"] == pytest.approx(_sigma(step), rel=1e-6)  # float32
        assert logs["gap"] == logs["accuracy"] - logs["val_accuracy"]
        assert "noise_covariance_trace" not in logs
        assert "noise_multiplicative_variance" not in logs
    # History (after every listed callback) and the CSV logger record the same values.
    assert history.history["noise_stddev"] == [logs["noise_stddev"] for _, logs in probe.epochs]
    with open(csv_path) as f:
        header = f.readline().strip().split(",")
    assert {"noise_step", "noise_stddev", "gap"} <= set(header)


def test_no_wrapper_logs_zero_noise_and_matched_noise_logs_its_trace_and_sigma():
    plain = _classifier(keras.optimizers.SGD(0.1))
    x, y = _data()
    plain.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert callbacks_lib.noise_values(plain) == {"noise_step": 3, "noise_stddev": 0.0}

    optimizer = MatchedNoiseOptimizer(
        keras.optimizers.SGD(0.1), batch_size=64, small_batch_size=16, ema_decay=0.5, seed=1
    )
    model = _classifier(optimizer)
    assert callbacks_lib.noise_values(model) == {}  # before the first update
    optimizer.build(model.trainable_variables)
    for estimate in (4.0, 2.0):  # what the engine does for each update: observe, then apply
        optimizer.observe_covariance_trace(estimate)
        optimizer.apply([np.zeros(v.shape, "float32") for v in model.trainable_variables])
    values = callbacks_lib.noise_values(model)
    # The bias-corrected average: (0.5 * 0.5 * 4 + 0.5 * 2) / (1 - 0.25) = 2.666...
    trace = (0.25 * 4.0 + 0.5 * 2.0) / 0.75
    d = 5 * 3 + 3
    assert values["noise_step"] == 1
    assert values["noise_covariance_trace"] == pytest.approx(trace, rel=1e-6)
    assert values["noise_stddev"] == pytest.approx(np.sqrt(trace * (64 / 16 - 1) / (64 * d)), 1e-6)


def test_multiplicative_noise_logs_its_variance():
    model = _classifier(keras.optimizers.SGD(0.1))
    enable_multiplicative_noise(model, batch_size=16, variance=0.25, seed=4)
    x, y = _data()
    logs = _Probe()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[NoiseLogger(), logs])
    ((_, values),) = logs.epochs
    assert values["noise_multiplicative_variance"] == 0.25
    assert "gap" not in values  # no validation data: no gap


def test_per_update_scalars_every_n_updates(tmp_path):
    x, y = _data()
    model = _classifier(NoisyOptimizer(keras.optimizers.SGD(0.1), ALPHA, GAMMA, seed=2))
    log_dir = str(tmp_path / "tb")
    logger = NoiseLogger(log_dir=log_dir, update_freq=3)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    scalars = read_scalars(os.path.join(log_dir, "train"))
    assert set(scalars) == {"update_noise_stddev"}
    written = scalars["update_noise_stddev"]
    assert sorted(written) == [0, 3, 6]  # 8 updates, t = 0..7
    for step, value in written.items():
        assert value == pytest.approx(_sigma(step), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gap_metric": ""}, r"gap_metric must be the name .*received gap_metric=''"),
        ({"gap_metric": "val_accuracy"}, r"without 'val_'; received gap_metric='val_accuracy'"),
        ({"gap_metric": 3}, r"received gap_metric=3"),
        ({"update_freq": 0, "log_dir": "x"}, r"update_freq must be an integer >= 1; .*=0"),
        ({"update_freq": True, "log_dir": "x"}, r"update_freq must be an integer >= 1"),
        ({"update_freq": 5}, r"update_freq=5 needs log_dir.*received log_dir=None"),
        ({"log_dir": "tb"}, r"log_dir='tb' is only used for the per-update scalars"),
        ({"log_dir": 7, "update_freq": 2}, r"log_dir must be a directory path.*log_dir=7"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoiseLogger(**kwargs)
