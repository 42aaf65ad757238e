"""Every way of saving a model keeps its noise, or says what it leaves out.

Covered elsewhere: `.keras` with `MatchedNoiseOptimizer`
(tests/noise/test_matched_noise.py) and the engine's own checkpoints
(`tf.train.Checkpoint`) with both kinds (tests/engine/test_noise_engine.py).
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras import MatchedNoiseOptimizer, NoisyOptimizer
from noisy_keras.data.epochs import epoch_batches
from noisy_keras.engine import fit as training
from noisy_keras.engine.distribute import make_strategy
from noisy_keras.noise import multiplicative


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _weights(model):
    return [np.asarray(w) for w in model.get_weights()]


def _assert_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


class _StopAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("stopped")


def test_keras_file_round_trip_restores_equal_optimizer(tmp_path):
    x, y = _data()
    inner = keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=0.5)
    optimizer = NoisyOptimizer(inner, 1e-3, 0.5, seed=77)
    model = _model(optimizer)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    restored = loaded.optimizer
    assert isinstance(restored, NoisyOptimizer)
    assert (restored.alpha, restored.gamma, restored.seed) == (1e-3, 0.5, 77)
    assert restored.clipping == {"global_clipnorm": 0.5}
    assert restored.inner_optimizer.global_clipnorm is None
    assert restored.inner_optimizer.get_config() == optimizer.inner_optimizer.get_config()
    assert int(restored.iterations) == 8
    _assert_equal([np.asarray(v) for v in restored.variables], optimizer.variables)
    # Both continue identically: same noise at step 8, same momentum.
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_equal(_weights(model), _weights(loaded))


def test_tf_checkpoint_restore_continues_noise_schedule(tmp_path):
    x, y = _data()

    def make():
        return _model(NoisyOptimizer(keras.optimizers.SGD(0.05), 1e-2, 0.55, seed=5))

    model = make()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    resumed = make()
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path).assert_consumed()
    assert int(resumed.optimizer.iterations) == 4
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_equal(_weights(model), _weights(resumed))


def test_backup_and_restore_continues_noise_schedule(tmp_path):
    x, y = _data()

    def make():
        return _model(NoisyOptimizer(keras.optimizers.SGD(0.05), 1e-2, 0.55, seed=6))

    straight = make()
    straight.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = make()
    with pytest.raises(RuntimeError, match="stopped"):
        interrupted.fit(
            x,
            y,
            batch_size=16,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[backup, _StopAtEpoch(2)],
        )
    resumed = make()
    resumed.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
    assert int(resumed.optimizer.iterations) == 16
    _assert_equal(_weights(straight), _weights(resumed))


def test_keras_file_under_mixed_float16_keeps_loss_scaling_noise_and_step(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()
    model = _model(NoisyOptimizer(keras.optimizers.SGD(0.05), 1e-2, 0.55, seed=3))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    noisy = loaded.optimizer.inner_optimizer
    assert isinstance(noisy, NoisyOptimizer) and (noisy.alpha, noisy.seed) == (1e-2, 3)
    assert int(loaded.optimizer.iterations) == 4
    assert float(loaded.optimizer.dynamic_scale) == float(model.optimizer.dynamic_scale)
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_equal(_weights(model), _weights(loaded))


def test_backup_and_restore_under_the_engine_continues_matched_noise(tmp_path):
    # Two replicas, two accumulated micro-batches per update: the moving average of
    # tr(Sigma) and the step counter come back, and a new model ends where the whole run does.
    x, y = _data()
    strategy = make_strategy("mirrored", 2)

    def build():
        inner = keras.optimizers.SGD(0.05, momentum=0.9)
        return _model(MatchedNoiseOptimizer(inner, batch_size=16, small_batch_size=4, seed=2))

    def run(callbacks=()):
        return training.fit(
            build,
            epoch_batches((x, y), batch_size=8, seed=0),
            epochs=3,
            steps_per_epoch=8,
            strategy=strategy,
            accumulation_steps=2,
            callbacks=list(callbacks),
            verbose=0,
        ).model

    whole = run()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="stopped"):
        run([backup, _StopAtEpoch(2)])
    resumed = run([backup])
    assert keras.ops.convert_to_numpy(resumed.optimizer.iterations) == 12
    assert float(resumed.optimizer.covariance_trace) == float(whole.optimizer.covariance_trace)
    _assert_equal(_weights(whole), _weights(resumed))


def test_export_serves_the_predictions_and_holds_no_optimizer(tmp_path):
    # An inference artifact: the model's forward pass, no optimizer, so no noise to continue.
    x, y = _data()
    model = _model(NoisyOptimizer(keras.optimizers.SGD(0.05), 1e-2, 0.55, seed=3))
    multiplicative.enable_multiplicative_noise(model, batch_size=16, variance=0.5, seed=1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x).numpy(), model.predict(x, verbose=0), rtol=1e-6)
    assert len(served.variables) == len(model.variables)  # the model's, none of the optimizer's


def test_multiplicative_noise_warns_on_save_and_continues_when_enabled_again(tmp_path):
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.05))
    multiplicative.enable_multiplicative_noise(model, batch_size=16, variance=0.5, seed=9)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    call = r"enable_multiplicative_noise\(model, batch_size=16, variance=0.5, seed=9\)"
    with pytest.warns(UserWarning, match=rf"not saved with the model .*{call}"):
        model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert multiplicative.active_multiplicative_noise(loaded) is None
    multiplicative.enable_multiplicative_noise(loaded, batch_size=16, variance=0.5, seed=9)
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_equal(_weights(model), _weights(loaded))
    multiplicative.disable_multiplicative_noise(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save(tmp_path / "plain.keras")  # no noise, no warning


@keras.saving.register_keras_serializable(package="noisy_keras_tests")
class OwnCompile(keras.Sequential):
    """A model compiled with defaults of its own when built, as KerasHub's tasks are."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile()

    def compile(self, optimizer="auto", loss="auto", **kwargs):
        optimizer = keras.optimizers.Adam(1e-3) if optimizer == "auto" else optimizer
        super().compile(optimizer=optimizer, loss="mse" if loss == "auto" else loss, **kwargs)


def test_a_model_with_its_own_compile_loses_the_wrapper_and_the_documented_recipe_restores_it(
    tmp_path,
):
    # Keras does not recompile such a model on loading (it warns); KerasHub's load_model and
    # from_preset give back its default Adam at step 0. Keeping the optimizer's config and
    # variables beside the model restores the wrapper and continues the same noise.
    x, y = _data()
    keras.utils.set_random_seed(1)
    model = OwnCompile([keras.Input((5,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(2)])
    model.compile(optimizer=NoisyOptimizer(keras.optimizers.SGD(0.05), 1e-2, 0.55, seed=3))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    optimizer_config = keras.optimizers.serialize(model.optimizer)
    tf.train.Checkpoint(optimizer=model.optimizer).write(str(tmp_path / "optimizer" / "ckpt"))

    with pytest.warns(UserWarning, match=r"compile\(\)` was not called as part of model loading"):
        loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is keras.optimizers.Adam

    optimizer = keras.optimizers.deserialize(optimizer_config)
    loaded.compile(optimizer=optimizer)
    optimizer.build(loaded.trainable_variables)
    checkpoint = tf.train.Checkpoint(optimizer=optimizer)
    checkpoint.read(str(tmp_path / "optimizer" / "ckpt")).assert_existing_objects_matched()
    assert isinstance(loaded.optimizer, NoisyOptimizer) and int(optimizer.iterations) == 4
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_equal(_weights(model), _weights(loaded))
