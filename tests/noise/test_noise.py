"""The schedule and the draw: pure functions, known answers."""

import math

import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.noise import draw as draw_lib
from noisy_keras.noise import schedules


def test_variance_matches_formula_at_known_steps():
    # sigma_t^2 = alpha / (1 + t)^gamma; at t = 0 it is alpha, at t = 99 it is alpha / 100^gamma.
    assert schedules.noise_variance(0, 1e-5, 0.55) == pytest.approx(1e-5, rel=1e-15)
    assert schedules.noise_variance(99, 1e-5, 0.55) == pytest.approx(1e-5 / 100**0.55, rel=1e-15)
    assert schedules.noise_variance(3, 2.0, 1.0) == pytest.approx(0.5, rel=1e-15)
    steps = np.arange(10)
    np.testing.assert_allclose(schedules.noise_variance(steps, 0.3, 0.0), np.full(10, 0.3))


def test_stddev_is_sqrt_of_variance_for_numbers_and_tensors():
    steps = np.array([0, 1, 10, 1000, 10**6])
    expected = np.sqrt(1e-5 / (1.0 + steps) ** 0.55)
    np.testing.assert_allclose(schedules.noise_stddev(steps), expected, rtol=1e-15)
    got = schedules.noise_stddev(tf.constant(steps, tf.int64)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    np.testing.assert_allclose(
        schedules.noise_variance(tf.constant(steps)).numpy(), expected**2, rtol=1e-6
    )


def test_unit_noise_depends_only_on_seed_and_step():
    shapes = [(3, 4), (4,), (), (2, 1, 2)]
    a = draw_lib.unit_noise(shapes, seed=5, step=7)
    b = draw_lib.unit_noise(shapes, seed=5, step=tf.constant(7, tf.int64))
    assert [tuple(t.shape) for t in a] == shapes
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    other_step = draw_lib.unit_noise(shapes, seed=5, step=8)
    other_seed = draw_lib.unit_noise(shapes, seed=6, step=7)
    assert not np.array_equal(a[0].numpy(), other_step[0].numpy())
    assert not np.array_equal(a[0].numpy(), other_seed[0].numpy())


def test_unit_noise_splits_one_draw_in_order():
    # The pieces are consecutive slices of one draw of the total size.
    shapes = [(2, 3), (5,)]
    pieces = draw_lib.unit_noise(shapes, seed=11, step=2)
    flat = draw_lib.standard_normal(11, seed=11, step=2).numpy()
    np.testing.assert_array_equal(pieces[0].numpy().ravel(), flat[:6])
    np.testing.assert_array_equal(pieces[1].numpy(), flat[6:])


def test_standard_normal_agrees_with_and_without_xla():
    step = tf.Variable(3, dtype=tf.int64)  # a run-time step, as in training

    def draw():
        return draw_lib.standard_normal(1001, seed=9, step=step)

    eager = draw().numpy()
    graph = tf.function(draw)().numpy()
    compiled = tf.function(draw, jit_compile=True)().numpy()
    np.testing.assert_array_equal(eager, graph)
    # Same Philox bits; log/sin/cos may round differently by a few ulp under XLA.
    np.testing.assert_allclose(compiled, eager, rtol=2e-6, atol=2e-6)
    assert not np.array_equal(eager, draw_lib.standard_normal(1001, seed=9, step=4).numpy())


def test_unit_noise_is_standard_normal():
    n = 200_000
    (z,) = draw_lib.unit_noise([(n,)], seed=1, step=0)
    z = z.numpy().astype(np.float64)
    # Mean ~ N(0, 1/n); sample variance has relative sd sqrt(2/(n-1)). Five sd.
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var(ddof=1) - 1.0) < 5 * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -1e-5, "gamma": 0.55}, "alpha"),
        ({"alpha": float("nan"), "gamma": 0.55}, "alpha"),
        ({"alpha": float("inf"), "gamma": 0.55}, "alpha"),
        ({"alpha": "1e-5", "gamma": 0.55}, "alpha"),
        ({"alpha": 1e-5, "gamma": -0.1}, "gamma"),
        ({"alpha": 1e-5, "gamma": 0.55, "seed": -1}, "seed"),
        ({"alpha": 1e-5, "gamma": 0.55, "seed": 2**31}, "seed"),
        ({"alpha": 1e-5, "gamma": 0.55, "seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedules.validate_noise_parameters(**kwargs)


@pytest.mark.parametrize("num, seed, step", [(1, 0, 0), (7, 5, 3), (1001, 2**31 - 1, 2**33 + 5)])
def test_philox_words_are_the_same_in_and_out_of_xla_bit_for_bit(num, seed, step):
    kernel = draw_lib._philox_words(num, seed, tf.constant(step, tf.int64)).numpy()
    loop = draw_lib._philox_words_loop(num, seed, tf.constant(step, tf.int64)).numpy()
    compiled = tf.function(lambda s: draw_lib._philox_words(num, seed, s), jit_compile=True)(
        tf.constant(step, tf.int64)
    ).numpy()
    assert kernel.dtype == np.uint32 and kernel.shape == (num,)
    np.testing.assert_array_equal(loop, kernel)
    np.testing.assert_array_equal(compiled, kernel)
