"""The training engine: XLA per replica, 1 vs 2 replicas, accumulation, NaN stop.

Two logical CPU devices (tests/conftest.py) stand in for two GPUs.
"""

import csv
import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.data.epochs import epoch_batches
from noisy_keras.engine import checkpointing
from noisy_keras.engine import fit as training
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.engine.rundir import RunDir
from noisy_keras.noise.callbacks import NoiseLogger
from noisy_keras.noise.optimizer import NoisyOptimizer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=64, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return x, y


class SmallNet(keras.Model):
    def __init__(self, batch_norm, dropout, l2):
        super().__init__()
        self.hidden = keras.layers.Dense(
            12, activation="tanh", kernel_regularizer="l2" if l2 else None
        )
        self.norm = keras.layers.BatchNormalization() if batch_norm else None
        self.drop = keras.layers.Dropout(0.2, seed=1) if dropout else None
        self.out = keras.layers.Dense(3)

    def build(self, input_shape):
        self.hidden.build(input_shape)
        if self.norm is not None:
            self.norm.build((None, 12))
        self.out.build((None, 12))

    def call(self, x, training=False):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.norm(h, training=training)
        if self.drop is not None:
            h = self.drop(h, training=training)
        return self.out(h)


def _model(kind="sequential", batch_norm=False, dropout=False, l2=False, seed=0):
    """A small classifier; built, not compiled. Call inside the strategy's scope."""
    keras.utils.set_random_seed(seed)
    if kind == "subclassed":
        model = SmallNet(batch_norm, dropout, l2)
        model.build((None, 6))
        return model
    layers = [keras.layers.Dense(12, activation="tanh", kernel_regularizer="l2" if l2 else None)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(0.2, seed=1))
    layers.append(keras.layers.Dense(3))
    if kind == "sequential":
        return keras.Sequential([keras.Input((6,)), *layers])
    inputs = keras.Input((6,))
    h = inputs
    for layer in layers:
        h = layer(h)
    return keras.Model(inputs, h)


def _weights(model):
    return [np.asarray(v) for v in model.weights]


def _train_args(model, x, y):
    """Arguments of the per-replica train function for one batch, as fit passes them."""
    return (
        [tf.convert_to_tensor(v.value) for v in model.trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.metrics_variables],
        tf.constant(1.0),
        tf.constant(x),
        tf.constant(y),
        None,
    )


# ---- 1. MirroredStrategy + XLA ------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_mirrored_xla_trains_compiled_with_identical_replicas(kind):
    strategy = make_strategy("mirrored", 2)
    x, y = _data()
    with strategy.scope():
        model = _model(kind, batch_norm=True, dropout=True, l2=True)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS, metrics=["accuracy"]
        )
    replica_xla.enable_replica_xla(model)
    before = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)["loss"]
    history = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    after = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)["loss"]
    predictions = model.predict(x[:8], batch_size=8, verbose=0)

    assert int(np.asarray(model.optimizer.iterations)) == 16
    assert after < 0.8 * before
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert predictions.shape == (8, 3)

    functions = replica_xla.replica_xla_functions(model)
    for name in ("train", "test", "predict"):
        assert functions[name].experimental_get_tracing_count() >= 1, name
    args = _train_args(model, x[:8], y[:8])
    concrete = functions["train"].get_concrete_function(*args)
    assert concrete.function_def.attr["_XlaMustCompile"].b
    hlo = functions["train"].experimental_get_compiler_ir(*args)(stage="hlo")
    assert "HloModule" in hlo

    variables = model.variables + model.optimizer.variables
    distributed = [v for v in variables if hasattr(v.value, "values")]
    assert len(distributed) >= len(model.weights)
    for variable in distributed:
        copies = [np.asarray(c) for c in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)


def test_without_jit_compile_the_replica_function_is_not_xla():
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    replica_xla.enable_replica_xla(model, jit_compile=False)
    x, y = _data(8)
    concrete = replica_xla.replica_xla_functions(model)["train"].get_concrete_function(
        *_train_args(model, x, y)
    )
    assert not concrete.function_def.attr["_XlaMustCompile"].b


@pytest.mark.xfail(
    strict=True,
    raises=tf.errors.InvalidArgumentError,
    reason="keras-team/keras#19005: compile(jit_compile=True) under MirroredStrategy compiles "
    "all replicas' variables on one device. When this passes, upstream fixed it.",
)
def test_keras_own_jit_compile_under_mirrored_strategy():
    strategy = make_strategy("mirrored", 2)
    x, y = _data(32)
    with strategy.scope():
        model = _model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=True)
    assert model.jit_compile is True  # else Keras fell back to no XLA and nothing is shown
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


# ---- 2. One device vs two replicas, noise on ------------------------------------


def _noisy_run(strategy, alpha, steps=20):
    x, y = _data(96)
    with strategy.scope():
        model = _model(l2=True, seed=3)
        optimizer = NoisyOptimizer(
            keras.optimizers.SGD(0.2, momentum=0.9), alpha=alpha, gamma=0.55, seed=5
        )
        model.compile(optimizer=optimizer, loss=LOSS)
    result = training.fit(
        model,
        epoch_batches((x, y), batch_size=16, seed=2),
        epochs=steps,
        steps_per_epoch=1,  # one step per epoch: history["loss"] is the per-step loss
        strategy=strategy,
        xla=True,
        verbose=0,
    )
    assert result.status == "done"
    assert int(np.asarray(model.optimizer.iterations)) == steps
    return np.asarray(result.history["loss"]), _weights(model)


def test_one_device_and_two_replicas_agree_with_noise():
    losses_1, weights_1 = _noisy_run(make_strategy("default"), alpha=1e-2)
    keras.utils.clear_session()
    losses_2, weights_2 = _noisy_run(make_strategy("mirrored", 2), alpha=1e-2)
    keras.utils.clear_session()
    _, weights_quiet = _noisy_run(make_strategy("default"), alpha=0.0)

    assert len(losses_1) == 20
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    for w2, w1 in zip(weights_2, weights_1, strict=True):
        # 1e-5 relative to each tensor's scale (a near-zero entry has no relative precision)
        np.testing.assert_allclose(w2, w1, rtol=1e-5, atol=1e-5 * np.max(np.abs(w1)))
    # The noise is on and matters: without it the weights end elsewhere.
    largest = max(np.max(np.abs(a - b)) for a, b in zip(weights_1, weights_quiet, strict=True))
    assert largest > 1e-3


# ---- 4. Accumulation --------------------------------------------------------------


def _accumulated_run(k, step_batch, alpha, updates=3):
    strategy = make_strategy("mirrored", 2)
    x, y = _data(96)
    with strategy.scope():
        model = _model(seed=4)
        inner = keras.optimizers.SGD(0.2, momentum=0.9)
        model.compile(optimizer=NoisyOptimizer(inner, alpha=alpha, seed=9), loss=LOSS)
    training.fit(
        model,
        epoch_batches((x, y), batch_size=step_batch, seed=6),
        epochs=1,
        steps_per_epoch=updates * k,
        strategy=strategy,
        xla=True,
        accumulation_steps=k,
        verbose=0,
    )
    assert int(np.asarray(model.optimizer.iterations)) == updates
    return _weights(model)


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_k_micro_batches_equal_one_batch_of_k_times_the_size(alpha):
    split = training.split_global_batch(32, num_replicas=2, accumulation_steps=4)
    assert (split.step_batch_size, split.per_replica_batch_size) == (8, 4)
    accumulated = _accumulated_run(4, split.step_batch_size, alpha)
    keras.utils.clear_session()
    whole = _accumulated_run(1, split.global_batch_size, alpha)
    for a, b in zip(accumulated, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if alpha:
        keras.utils.clear_session()
        quiet = _accumulated_run(1, split.global_batch_size, 0.0)
        assert max(np.max(np.abs(a - b)) for a, b in zip(whole, quiet, strict=True)) > 1e-3


def test_split_global_batch_rejects_sizes_that_do_not_divide():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=1000 is not divisible by num_replicas x accumulation_steps = "
        r"3 x 4 = 12; allowed: multiples of 12, e.g. 996 or 1008",
    ):
        training.split_global_batch(1000, num_replicas=3, accumulation_steps=4)
    with pytest.raises(
        ValueError, match=r"num_replicas must be an integer >= 1; received num_replicas=0"
    ):
        training.split_global_batch(64, num_replicas=0)


def test_fit_rejects_epochs_that_end_inside_an_accumulation():
    model = _model()
    inner = keras.optimizers.SGD(0.1)
    model.compile(optimizer=NoisyOptimizer(inner, alpha=0.0, seed=1), loss=LOSS)
    x, y = _data(64)
    with pytest.raises(ValueError, match=r"steps_per_epoch=6 is not a multiple of .*=4"):
        training.fit(
            model,
            epoch_batches((x, y), batch_size=8, seed=0),
            epochs=1,
            steps_per_epoch=6,
            accumulation_steps=4,
            verbose=0,
        )


def test_fit_refuses_mid_epoch_backups_before_training(tmp_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = _data(64)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=3)
    with pytest.raises(ValueError, match=r"BackupAndRestore\(save_freq=3\).*save_freq='epoch'"):
        training.fit(
            model,
            epoch_batches((x, y), batch_size=8, seed=0),
            epochs=1,
            steps_per_epoch=8,
            callbacks=[backup],
            verbose=0,
        )
    assert int(model.optimizer.iterations) == 0 and not (tmp_path / "backup").exists()


def test_accumulation_has_one_owner_the_engine():
    """An optimizer with Keras' own accumulation is refused, with the engine's argument named."""
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=4), loss=LOSS)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4.*accumulation_steps=4"):
        replica_xla.enable_replica_xla(model)


# ---- 6. NaN stop ---------------------------------------------------------------------


class _EpochSnapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = _weights(self.model)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    x, y = _data(64)
    clean = epoch_batches((x, y), batch_size=16, seed=1)

    def poisoned(epoch):  # batch 2 of epoch 1 (global step 6) has NaN inputs
        def poison(index, batch):
            bx, by = batch
            bad = tf.logical_and(tf.equal(epoch, 1), tf.equal(index, 2))
            return tf.where(bad, tf.fill(tf.shape(bx), np.float32(np.nan)), bx), by

        return clean(epoch).enumerate().map(poison)

    def build():
        model = _model(seed=2)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        return model

    snapshots = _EpochSnapshots()
    result = training.fit(
        build,
        poisoned,
        epochs=3,
        steps_per_epoch=4,
        workdir=str(tmp_path),
        callbacks=[snapshots],
        xla=True,
        verbose=0,
    )

    assert result.status == "diverged"
    assert result.diverged_at == {"step": 6, "epoch": 1, "batch": 2}
    assert "in epoch 2, batch 3 of 4 (step 6, counting steps from 0)" in result.message
    assert result.epochs_completed == 1
    assert not all(np.all(np.isfinite(w)) for w in _weights(result.model))
    assert RunDir(str(tmp_path)).read_status()["status"] == "diverged"
    assert result.checkpoint.endswith("ckpt-1")
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if f.startswith("ckpt-2")]

    fresh = build()
    fresh.optimizer.build(fresh.trainable_variables)
    restored = checkpointing.Checkpointer(fresh, str(tmp_path / "checkpoints")).restore_latest()
    assert restored == 1
    for a, b in zip(_weights(fresh), snapshots.weights[0], strict=True):
        np.testing.assert_array_equal(a, b)


# ---- checkpoints and callbacks ---------------------------------------------------------


def _state(model):
    return [np.asarray(v) for v in model.variables + model.optimizer.variables]


def test_an_unfinished_checkpoint_is_ignored_and_all_state_is_restored(tmp_path):
    model = _model(batch_norm=True, dropout=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS)
    x, y = _data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # moves BN stats, RNG state, slots
    checkpointer = checkpointing.Checkpointer(model, str(tmp_path))
    checkpointer.save(1)
    saved = _state(model)
    # A process killed while writing checkpoint 2 leaves files the state file does not name.
    (tmp_path / "ckpt-2.index").write_bytes(b"partial")
    (tmp_path / "ckpt-2.data-00000-of-00001").write_bytes(b"")
    assert checkpointing.checkpointed_epochs(str(tmp_path)) == 1  # read from the name
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # Every model variable (weights, BN statistics, dropout RNG state) moved on.
    moved = [not np.array_equal(np.asarray(v), b) for v, b in zip(model.variables, saved)]
    assert all(moved) and len(moved) == 9
    assert checkpointer.restore_latest() == 1
    for a, b in zip(_state(model), saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_callbacks_keep_working_under_the_engine(tmp_path):
    strategy = make_strategy("mirrored", 2)
    x, y = _data(64)
    with strategy.scope():
        model = _model(batch_norm=True)
        optimizer = NoisyOptimizer(keras.optimizers.SGD(0.1), alpha=1e-3, gamma=0.55, seed=1)
        model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    csv_path = tmp_path / "log.csv"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    callbacks = [
        NoiseLogger(),  # first: the callbacks after it record its values
        keras.callbacks.CSVLogger(str(csv_path)),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=10),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
    ]
    if tensorboard:  # optional dependency
        callbacks.append(keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=False))
    result = training.fit(
        model,
        epoch_batches((x, y), batch_size=16, seed=0),
        epochs=3,
        steps_per_epoch=4,
        validation_data=(x, y),
        workdir=str(tmp_path / "run"),
        callbacks=callbacks,
        xla=True,
        verbose=0,
    )
    assert result.status == "done"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    for row in rows:  # the epoch's last update, t = 4 (e + 1) - 1, under 2 replicas and XLA
        t = 4 * (int(row["epoch"]) + 1) - 1
        assert int(row["noise_step"]) == t
        assert float(row["noise_stddev"]) == pytest.approx(np.sqrt(1e-3 / (1 + t) ** 0.55), 1e-6)
        gap = float(row["accuracy"]) - float(row["val_accuracy"])
        assert float(row["gap"]) == pytest.approx(gap, abs=1e-6)  # CSVLogger's float32 text
    if tensorboard:
        events = [f for _, _, fs in os.walk(tmp_path / "tb") for f in fs if "tfevents" in f]
        assert events
    assert not (tmp_path / "backup").exists()  # BackupAndRestore cleans up after success
    assert RunDir(str(tmp_path / "run")).read_status()["status"] == "done"


def test_enable_replica_xla_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match=r"must be compiled before enable_replica_xla"):
        replica_xla.enable_replica_xla(_model())

    class CustomStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model = CustomStep([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match=r"overrides `train_step`"):
        replica_xla.enable_replica_xla(model)
