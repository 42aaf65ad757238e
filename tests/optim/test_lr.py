"""Learning-rate rules: scaling, warm-up, the paper's step decay, the Keras schedule."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.optim import lr
from noisy_keras.optim import schedule as schedule_lib


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", 0.04), ("sqrt", 0.02), ("none", 0.01)],
)
def test_scale_learning_rate_rules(rule, expected):
    # B / B0 = 4: linear x4, sqrt x2, none x1.
    assert lr.scale_learning_rate(0.01, 128, 32, rule) == pytest.approx(expected, rel=1e-12)


def test_scale_learning_rate_paper_values():
    # Jaiswal & Taura: B=32 lr 0.01, B=64 lr 0.02, B=128 lr 0.04.
    assert [lr.scale_learning_rate(0.01, b, 32) for b in (32, 64, 128)] == pytest.approx(
        [0.01, 0.02, 0.04]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rule": "cubic"},
            r"rule must be one of \('linear', 'sqrt', 'none'\); received rule='cubic'",
        ),
        ({"base_learning_rate": -0.1}, r"base_learning_rate=-0.1"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1; received batch_size=0"),
        ({"base_batch_size": 2.5}, r"base_batch_size=2.5"),
    ],
)
def test_scale_learning_rate_rejects_bad_values(kwargs, message):
    args = {"base_learning_rate": 0.01, "batch_size": 64, "base_batch_size": 32, "rule": "linear"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lr.scale_learning_rate(**args)


def test_num_decays_paper_boundaries():
    expected = {0: 0, 24: 0, 25: 1, 39: 1, 40: 2, 49: 2, 50: 3, 59: 3, 60: 4, 75: 5, 100: 8}
    assert {e: lr.num_decays(e) for e in expected} == expected


def test_num_decays_without_listed_boundaries_and_without_period():
    assert [lr.num_decays(e, (), 10) for e in (0, 9, 10, 19, 20)] == [0, 0, 1, 1, 2]
    assert [lr.num_decays(e, (3, 5), None) for e in (2, 3, 5, 100)] == [0, 1, 2, 2]


def test_step_decay_multiplier_both_readings():
    assert lr.step_decay_multiplier(24) == 1.0
    assert lr.step_decay_multiplier(45) == pytest.approx(0.9**2)
    assert lr.step_decay_multiplier(61, decay_factor=0.1) == pytest.approx(1e-4)


def test_warmup_is_linear_per_step():
    values = [
        lr.warmup_learning_rate(
            s, start_learning_rate=0.01, peak_learning_rate=0.05, warmup_steps=4
        )
        for s in range(6)
    ]
    assert values == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.05])


def _schedule(**overrides):
    kwargs = dict(
        peak_learning_rate=0.04,
        steps_per_epoch=3,
        warmup_epochs=2,
        warmup_start_learning_rate=0.01,
        decay_factor=0.5,
        decay_epochs=(4, 6),
        decay_every=2,
    )
    kwargs.update(overrides)
    return schedule_lib.WarmupStepDecay(**kwargs)


def test_schedule_values_by_hand():
    schedule = _schedule()
    # 6 warm-up steps from 0.01 to 0.04 (0.005 per step); decays at epochs 4, 6, 8, 10, ...
    expected = {
        0: 0.01,
        1: 0.015,
        5: 0.035,
        6: 0.04,
        11: 0.04,
        12: 0.02,  # epoch 4
        17: 0.02,
        18: 0.01,  # epoch 6
        24: 0.005,  # epoch 8
        30: 0.0025,  # epoch 10
    }
    assert {s: schedule.value_at(s) for s in expected} == pytest.approx(expected, rel=1e-12)
    tensor_values = {s: float(schedule(tf.constant(s, tf.int64))) for s in expected}
    assert tensor_values == pytest.approx(expected, rel=1e-6)


def test_learning_rate_at_matches_schedule_and_paper_defaults():
    assert schedule_lib.learning_rate_at(25 * 10, peak_learning_rate=0.04, steps_per_epoch=10) == (
        pytest.approx(0.036)
    )
    assert schedule_lib.learning_rate_at(0, peak_learning_rate=0.04, steps_per_epoch=10) == 0.04


def test_schedule_inside_xla_matches_python():
    schedule = schedule_lib.WarmupStepDecay(
        0.08, steps_per_epoch=7, warmup_epochs=1.5, warmup_start_learning_rate=0.02
    )
    steps = np.arange(0, 7 * 70, 13, dtype=np.int64)
    compiled = tf.function(
        lambda s: tf.map_fn(schedule, s, fn_output_signature=tf.float32), jit_compile=True
    )
    values = compiled(tf.constant(steps)).numpy()
    expected = [schedule.value_at(int(s)) for s in steps]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    # By epoch 69 the boundaries 25, 40, 50 and 60 have passed (70 not yet): 4 decays.
    assert schedule.value_at(7 * 69) == pytest.approx(0.08 * 0.9**4)


def test_schedule_drives_an_optimizer_step_count():
    schedule = _schedule(warmup_epochs=0, warmup_start_learning_rate=None)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    variable = keras.Variable(1.0)
    for _ in range(12):
        optimizer.apply_gradients([(tf.constant(1.0), variable)])
    # 12 steps at 0.04 (epochs 0-3); the 13th update (step 12, epoch 4) would use 0.02.
    assert float(variable.numpy()) == pytest.approx(1.0 - 12 * 0.04, rel=1e-6)
    assert float(optimizer.learning_rate) == pytest.approx(0.02)


def test_schedule_config_round_trip():
    schedule = _schedule()
    config = keras.optimizers.schedules.serialize(schedule)
    restored = keras.optimizers.schedules.deserialize(config)
    assert isinstance(restored, schedule_lib.WarmupStepDecay)
    assert restored.get_config() == schedule.get_config()
    assert restored.decay_epochs == (4, 6)
    assert [restored.value_at(s) for s in range(40)] == [schedule.value_at(s) for s in range(40)]


def test_optimizer_with_schedule_round_trips():
    optimizer = keras.optimizers.SGD(learning_rate=_schedule())
    restored = keras.optimizers.SGD.from_config(optimizer.get_config())
    restored.iterations.assign(13)
    # Step 13 is epoch 4 of 3 steps each: after warm-up and one decay, 0.04 * 0.5.
    assert float(restored.learning_rate) == pytest.approx(0.02)


def test_paper_schedule_scales_and_warms_up_from_the_base_rate():
    schedule = schedule_lib.paper_schedule(
        base_learning_rate=0.01,
        batch_size=128,
        base_batch_size=32,
        steps_per_epoch=5,
        warmup_epochs=1,
    )
    assert schedule.value_at(0) == pytest.approx(0.01)
    assert schedule.value_at(5) == pytest.approx(0.04)
    assert schedule.value_at(25 * 5) == pytest.approx(0.036)
    assert schedule_lib.paper_schedule(
        base_learning_rate=0.01,
        batch_size=128,
        base_batch_size=32,
        steps_per_epoch=5,
        rule="sqrt",
    ).value_at(0) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"steps_per_epoch": 0},
            r"steps_per_epoch must be an integer >= 1; received steps_per_epoch=0",
        ),
        ({"decay_factor": 1.5}, r"decay_factor must be a number in \(0, 1\].*decay_factor=1.5"),
        ({"decay_epochs": (40, 25)}, r"strictly increasing.*decay_epochs=\(40, 25\)"),
        ({"decay_every": 0}, r"decay_every must be an integer >= 1; received decay_every=0"),
        (
            {"warmup_epochs": -1},
            r"warmup_epochs must be a finite number >= 0; received warmup_epochs=-1",
        ),
        ({"warmup_epochs": 0}, r"only used with warmup_epochs > 0"),
        ({"peak_learning_rate": math.inf}, r"peak_learning_rate=inf"),
    ],
)
def test_schedule_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _schedule(**overrides)
