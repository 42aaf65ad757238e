"""LARS against a NumPy reference of the update, step by step, and on the paths users take."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.engine.distribute import make_strategy
from noisy_keras.noise.optimizer import NoisyOptimizer
from noisy_keras.optim.lars import LARS

SHAPES = [(3, 4), (4,), (2, 2, 2)]
HYPER = dict(learning_rate=0.5, momentum=0.9, weight_decay_rate=0.1, eeta=0.01)


def reference_step(w, g, v, *, lr, momentum, eeta, wd, nesterov, classic, decay, adapt):
    """One LARS step in float64, written from the formulas of You et al. (2017) / Model Garden."""
    w, g, v = (np.asarray(a, np.float64) for a in (w, g, v))
    if decay:
        g = g + wd * w

    def trust(direction):
        w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(direction)
        return eeta * w_norm / d_norm if adapt and w_norm > 0 and d_norm > 0 else 1.0

    if classic:
        scaled_lr = lr * trust(g)
        v = momentum * v + scaled_lr * g
        update = momentum * v + scaled_lr * g if nesterov else v
        return w - update, v
    v = momentum * v + g
    update = momentum * v + g if nesterov else v
    return w - lr * trust(update) * update, v


def reference_run(inits, grads_per_step, decays, adapts, hyper, nesterov, classic):
    ws = [np.asarray(w, np.float64) for w in inits]
    vs = [np.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            ws[i], vs[i] = reference_step(
                ws[i],
                g,
                vs[i],
                lr=hyper["learning_rate"],
                momentum=hyper["momentum"],
                eeta=hyper["eeta"],
                wd=hyper["weight_decay_rate"],
                nesterov=nesterov,
                classic=classic,
                decay=decays[i],
                adapt=adapts[i],
            )
    return ws, vs


def random_problem(shapes, steps, seed=0):
    """Weights and gradients of different sizes per variable, so trust ratios differ."""
    rng = np.random.default_rng(seed)
    inits = [rng.normal(size=s).astype(np.float32) * (i + 1) for i, s in enumerate(shapes)]
    grads = [
        [rng.normal(size=s).astype(np.float32) * 10.0 ** (i - 1) for i, s in enumerate(shapes)]
        for _ in range(steps)
    ]
    return inits, grads


def assert_close(got, want):
    """Float32 against the float64 reference: rtol 1e-6 per entry, plus 1e-6 of the largest
    entry, since an entry that cancels (w - v with both large) keeps the rounding error of
    the large terms (float32 spacing 1.2e-7 relative, over a few steps and two norms)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def apply_steps(optimizer, variables, grads_per_step, compiled=False):
    def step(grads):
        optimizer.apply(grads, variables)

    step = tf.function(step, jit_compile=True) if compiled else step
    optimizer.build(variables)
    for grads in grads_per_step:
        step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables], [
        optimizer.momentums[i].numpy() for i in range(len(variables))
    ]


# ---- 1, 2. classic and non-classic momentum, plain and Nesterov, eager and XLA -----------


def test_one_step_by_hand():
    # ||w|| = 5, ||g|| = 1: trust = 0.1 * 5 / 1 = 0.5, v = 1 * 0.5 * g, w - v.
    w = keras.Variable(np.array([3.0, 4.0], np.float32))
    LARS(1.0, momentum=0.9, eeta=0.1).apply([tf.constant([0.6, 0.8])], [w])
    np.testing.assert_allclose(w.numpy(), [2.7, 3.6], rtol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("classic", [True, False], ids=["classic", "popular"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "xla"])
def test_matches_reference_with_weight_decay(classic, nesterov, compiled):
    inits, grads = random_problem(SHAPES, steps=5)
    variables = [keras.Variable(w) for w in inits]
    optimizer = LARS(**HYPER, nesterov=nesterov, classic_momentum=classic)
    got_w, got_v = apply_steps(optimizer, variables, grads, compiled)
    want_w, want_v = reference_run(inits, grads, [True] * 3, [True] * 3, HYPER, nesterov, classic)
    for got, want in zip(got_w + got_v, want_w + want_v):
        assert_close(got, want)
    # The trust ratio matters here: plain momentum SGD would be far off.
    sgd_w, _ = reference_run(inits, grads, [True] * 3, [False] * 3, HYPER, nesterov, classic)
    assert all(np.abs(a - b).max() > 1e-2 for a, b in zip(sgd_w, want_w))


# ---- 3. exclusions, matched on the variable path ---------------------------------------


def _bn_model():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="dense"),
            keras.layers.BatchNormalization(name="batch_normalization"),
        ]
    )
    rng = np.random.default_rng(1)
    for v in model.trainable_variables:  # gamma = 1, beta = 0 would hide the trust ratio
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    return model


@pytest.mark.parametrize(
    "exclude_decay, exclude_adaptation, decays, adapts",
    [
        (["bias", "batch_normalization"], None, [1, 0, 0, 0], [1, 0, 0, 0]),
        (["bias"], ["gamma"], [1, 0, 1, 1], [1, 1, 0, 1]),
        (["bias", "beta"], [], [1, 0, 1, 0], [1, 1, 1, 1]),
        (None, ["^sequential/dense/"], [1, 1, 1, 1], [0, 0, 1, 1]),
    ],
    ids=["adaptation_defaults_to_decay_list", "separate_lists", "empty_adapts_all", "anchored"],
)
def test_exclusions(exclude_decay, exclude_adaptation, decays, adapts):
    model = _bn_model()
    variables = model.trainable_variables
    assert [v.path for v in variables] == [
        "sequential/dense/kernel",
        "sequential/dense/bias",
        "sequential/batch_normalization/gamma",
        "sequential/batch_normalization/beta",
    ]
    inits = [v.numpy() for v in variables]
    _, grads = random_problem([v.shape for v in variables], steps=3, seed=2)
    hyper = dict(HYPER, eeta=0.2, weight_decay_rate=0.5)  # large enough to see every flag
    optimizer = LARS(
        **hyper,
        exclude_from_weight_decay=exclude_decay,
        exclude_from_layer_adaptation=exclude_adaptation,
    )
    for step_grads in grads:
        optimizer.apply([tf.constant(g) for g in step_grads], variables)
    want, _ = reference_run(inits, grads, decays, adapts, hyper, False, True)
    everything, _ = reference_run(inits, grads, [1] * 4, [1] * 4, hyper, False, True)
    for v, w, full, d, a in zip(variables, want, everything, decays, adapts):
        assert_close(v.numpy(), w)
        if not (d and a):  # each exclusion moves its variable 100 tolerances away, at least
            assert not np.allclose(w, full, rtol=1e-4, atol=1e-4 * np.abs(w).max())


# ---- 4. zero weights and zero gradients: trust 1, no NaN ----------------------------------


@pytest.mark.parametrize("classic", [True, False], ids=["classic", "popular"])
def test_zero_norms_give_trust_one(classic):
    g = np.array([0.3, -1.2, 2.0], np.float32)
    w_nonzero = np.array([1.0, 2.0, -0.5], np.float32)
    variables = [
        keras.Variable(np.zeros(3, np.float32)),  # ||w|| = 0
        keras.Variable(w_nonzero),  # ||g|| = 0
        keras.Variable(np.zeros(3, np.float32)),  # both 0
    ]
    zeros = np.zeros(3, np.float32)
    hyper = dict(HYPER, weight_decay_rate=0.0)
    optimizer = LARS(**hyper, classic_momentum=classic)
    optimizer.apply([tf.constant(g), tf.constant(zeros), tf.constant(zeros)], variables)
    # Trust 1 makes the first step plain SGD, exactly: w = 0 - lr * g.
    np.testing.assert_array_equal(variables[0].numpy(), -(np.float32(0.5) * g))
    np.testing.assert_array_equal(variables[1].numpy(), w_nonzero)
    np.testing.assert_array_equal(variables[2].numpy(), zeros)
    optimizer.apply([tf.constant(g), tf.constant(zeros), tf.constant(zeros)], variables)
    want, _ = reference_run(
        [zeros, w_nonzero, zeros], [[g, zeros, zeros]] * 2, [0] * 3, [1] * 3, hyper, False, classic
    )
    assert_close(variables[0].numpy(), want[0])
    np.testing.assert_array_equal(variables[1].numpy(), w_nonzero)
    np.testing.assert_array_equal(variables[2].numpy(), zeros)


def test_indexed_slices_gradient_equals_its_dense_form():
    rows = tf.IndexedSlices(tf.constant([[1.0, 2.0], [-3.0, 0.5]]), tf.constant([0, 3]), [5, 2])
    results = []
    for grad in (rows, tf.convert_to_tensor(rows)):
        v = keras.Variable(np.arange(10, dtype=np.float32).reshape(5, 2))
        optimizer = LARS(**dict(HYPER, weight_decay_rate=0.0))  # decay would densify anyway
        for _ in range(2):
            optimizer.apply([grad], [v])
        results.append(v.numpy())
    np.testing.assert_array_equal(results[0], results[1])


# ---- 5. through NoisyOptimizer(alpha=0), with model.fit(jit_compile=True) ------------------


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 2))).astype(np.float32)
    return x, y


def _fit(make_optimizer, layers=("dense", "bn"), epochs=3, jit_compile=True, strategy=None):
    x, y = _data()
    with (strategy or tf.distribute.get_strategy()).scope():
        keras.utils.set_random_seed(1)
        stack = [keras.Input((5,)), keras.layers.Dense(8, "tanh")]
        if "bn" in layers:
            stack.append(keras.layers.BatchNormalization())
        model = keras.Sequential(stack + [keras.layers.Dense(2)])
        model.compile(optimizer=make_optimizer(), loss="mse", jit_compile=jit_compile)
    assert model.jit_compile is jit_compile  # Keras turns XLA off silently in some states
    initial = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model, initial


def _lars():
    return LARS(**HYPER, nesterov=True, exclude_from_weight_decay=["bias", "batch_normalization"])


def test_noise_wrapper_with_alpha_zero_is_bit_identical_under_xla():
    bare, initial = _fit(_lars)
    wrapped, _ = _fit(lambda: NoisyOptimizer(_lars(), alpha=0.0, seed=0))
    for a, b, start in zip(bare.get_weights(), wrapped.get_weights(), initial):
        assert np.array_equal(a, b)
        assert not np.array_equal(a, start)
    # XLA computes the same update as the plain graph.
    plain, _ = _fit(_lars, jit_compile=False)
    for a, b in zip(bare.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- 6. serialization --------------------------------------------------------------------


def test_config_round_trip():
    optimizer = LARS(
        0.3,
        momentum=0.8,
        weight_decay_rate=1e-4,
        eeta=0.002,
        nesterov=True,
        classic_momentum=False,
        exclude_from_weight_decay=["bias"],
        exclude_from_layer_adaptation=["gamma"],
        clipnorm=1.0,
        name="lars",
    )
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == "noisy_keras>LARS"
    clone = keras.optimizers.deserialize(serialized)
    assert isinstance(clone, LARS)
    assert clone.get_config() == optimizer.get_config()
    assert LARS.from_config(optimizer.get_config()).get_config() == optimizer.get_config()
    config = optimizer.get_config()
    assert (config["exclude_from_layer_adaptation"], config["clipnorm"]) == (["gamma"], 1.0)
    assert "weight_decay" not in config
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(LARS(schedule)))
    assert clone.learning_rate.numpy() == pytest.approx(0.1)


def test_keras_file_round_trip_restores_slots_and_continues_identically(tmp_path):
    model, _ = _fit(_lars, layers=("dense",), epochs=2)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    assert isinstance(loaded.optimizer, LARS)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == 8
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, y = _data()
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---- 7. bad arguments ---------------------------------------------------------------------


BAD_ARGUMENTS = [
    ({"momentum": -0.1}, r"`momentum` .*\[0, 1\].*momentum=-0\.1"),
    ({"momentum": 1.5}, r"momentum=1\.5"),
    ({"momentum": float("nan")}, r"momentum=nan"),
    ({"eeta": -0.001}, r"`eeta` .*> 0.*eeta=-0\.001"),
    ({"eeta": 0.0}, r"eeta=0\.0"),
    ({"weight_decay_rate": -1e-4}, r"`weight_decay_rate` .*>= 0.*weight_decay_rate=-0\.0001"),
    ({"weight_decay_rate": True}, r"weight_decay_rate=True"),
    ({"nesterov": "yes"}, r"`nesterov` must be True or False.*nesterov='yes'"),
    ({"exclude_from_weight_decay": "bias"}, r"list of .*exclude_from_weight_decay='bias'"),
    ({"exclude_from_layer_adaptation": ["bias", 3]}, r"strings only.*3 of type int"),
    ({"exclude_from_weight_decay": ["("]}, r"'\(', which is not a regular expression"),
    ({"weight_decay": 0.01}, r"weight_decay=0\.01.*weight_decay_rate"),
]


def test_bad_arguments_are_named():
    for kwargs, pattern in BAD_ARGUMENTS:
        with pytest.raises(ValueError, match=pattern):
            LARS(**kwargs)


def test_keras_weight_decay_exclusion_method_is_refused():
    with pytest.raises(ValueError, match=r"constructor argument.*var_names=\['bias'\]"):
        LARS().exclude_from_weight_decay(var_names=["bias"])


# ---- 8. MirroredStrategy over 2 replicas ----------------------------------------------------


def test_mirrored_two_replicas_match_one_device_and_agree():
    # jit_compile=False on both: XLA cannot place a step over variables on two CPU devices.
    one, _ = _fit(_lars, layers=("dense",), jit_compile=False)
    two, _ = _fit(
        _lars, layers=("dense",), jit_compile=False, strategy=make_strategy("mirrored", 2)
    )
    for a, b in zip(one.get_weights(), two.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    mirrored = two.trainable_variables + two.optimizer.momentums
    for variable in mirrored:
        copies = [c.numpy() for c in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
