"""Benchmark part "noise": what NoisyOptimizer costs per step, and the floor of drawing it.

Step time of `NoisyOptimizer(inner)` / `inner` alone (SGD with momentum, Adam),
digits CNN at B=512 and ResNet-20 at B=128 (synthetic 32x32x3 inputs), one
device, with and without XLA; the overhead per parameter next to its floor
(drawing as many normals with `tf.random.stateless_normal` alone, one
elementwise pass over the parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from noisy_keras.bench import harness, workloads
from noisy_keras.noise import draw
from noisy_keras.noise.optimizer import NoisyOptimizer


def measure_noise_overhead(
    workload: workloads.Workload,
    *,
    optimizer: str,
    jit_compile: bool,
    rounds: int,
    steps_per_round: int,
    alpha: float = 1e-5,
) -> dict:
    """Median step time with `NoisyOptimizer(inner)` and with `inner` alone, side by side.

    One model and one fixed batch (already on the device) serve both: two
    train steps (`_train_step`) differ only in the optimizer, each a fresh
    `inner` of the same kind, one wrapped. Their step times are taken in
    alternating blocks (`interleaved_step_times`).

    Returns:
        A dict with the case, `bare_ms` and `noisy_ms` (medians), `ratio` =
        noisy_ms / bare_ms, `overhead_pct` = 100 (ratio - 1), `params` (P)
        and `overhead_ns_per_param` = (noisy - bare) / P in ns.
    """

    keras.utils.clear_session()
    model = workloads.build_workload_model(workload)
    x, y = workloads.batch_arrays(workload)
    x, y = tf.constant(x), tf.constant(y)
    bare = workloads.train_step(model, workloads.inner_optimizer(optimizer), jit_compile)
    noisy = workloads.train_step(
        model,
        NoisyOptimizer(workloads.inner_optimizer(optimizer), alpha=alpha, seed=0),
        jit_compile,
    )
    times = harness.interleaved_step_times(
        {"bare": lambda: bare(x, y).numpy(), "noisy": lambda: noisy(x, y).numpy()},
        rounds=rounds,
        steps_per_round=steps_per_round,
    )
    params = workloads.count_parameters(model)
    bare_s, noisy_s = harness.median(times["bare"]), harness.median(times["noisy"])
    ratio = noisy_s / bare_s
    return {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "optimizer": optimizer,
        "xla": jit_compile,
        "params": params,
        "steps_timed": len(times["bare"]),
        "bare_ms": bare_s * 1e3,
        "noisy_ms": noisy_s * 1e3,
        "ratio": ratio,
        "overhead_pct": 100.0 * (ratio - 1.0),
        "overhead_ns_per_param": (noisy_s - bare_s) * 1e9 / params,
    }


def measure_noise_floor(
    shapes: Sequence, *, jit_compile: bool, rounds: int, steps_per_round: int
) -> dict:
    """ns per parameter of drawing the noise alone, and of its floors.

    For P = total size of `shapes`, each timed in its own `tf.function`
    (XLA or not) that writes its result into a preallocated variable (so the
    result is materialised, as in a step) and advances a step counter (so
    nothing is constant-folded), in alternating blocks:

    * `unit_noise`: this package's draw, `draw.unit_noise(shapes, seed, t)`,
      added to the variables (what NoisyOptimizer does per step, minus the
      gradient read);
    * `philox`: `tf.random.stateless_normal([P], alg="philox")`, the floor;
    * `auto_select`: the same with TensorFlow's default `alg="auto_select"`;
    * `elementwise`: one pass over P floats, `out = x + 1`.

    Returns:
        {"params", "xla", "<name>_ns_per_param" for each, "unit_noise_vs_philox"}.
    """

    shapes = [tf.TensorShape(s) for s in shapes]
    params = int(sum(s.num_elements() for s in shapes))
    step = tf.Variable(0, dtype=tf.int64)
    flat = tf.Variable(tf.zeros([params]))
    source = tf.Variable(tf.ones([params]))
    per_variable = [tf.Variable(tf.zeros(s)) for s in shapes]

    def compiled(fn):
        return tf.function(fn, jit_compile=jit_compile)

    def key():
        return tf.stack([step.assign_add(1), tf.constant(0, tf.int64)])

    @compiled
    def unit_noise():
        draws = draw.unit_noise(shapes, seed=0, step=step.assign_add(1))
        for variable, z in zip(per_variable, draws):
            variable.assign_add(1e-3 * z)
        return step.read_value()

    @compiled
    def philox():
        flat.assign(tf.random.stateless_normal([params], key(), alg="philox"))
        return step.read_value()

    @compiled
    def auto_select():
        flat.assign(tf.random.stateless_normal([params], key(), alg="auto_select"))
        return step.read_value()

    @compiled
    def elementwise():
        flat.assign(source + 1.0)
        return step.read_value()

    functions = {
        "unit_noise": unit_noise,
        "philox": philox,
        "auto_select": auto_select,
        "elementwise": elementwise,
    }
    times = harness.interleaved_step_times(
        {name: (lambda f=f: f().numpy()) for name, f in functions.items()},
        rounds=rounds,
        steps_per_round=steps_per_round,
    )
    result = {"params": params, "xla": jit_compile}
    for name in functions:
        result[f"{name}_ns_per_param"] = harness.median(times[name]) * 1e9 / params
    result["unit_noise_vs_philox"] = (
        result["unit_noise_ns_per_param"] / result["philox_ns_per_param"]
    )
    return result


def part(quick: bool) -> dict:
    if quick:
        cases_to_run = [workloads.Workload(workloads.DIGITS_MLP, 64)]
        optimizers = ("momentum",)
        schedule = {workloads.DIGITS_MLP: (2, 2)}
        floor_schedule = (2, 2)
    else:
        cases_to_run = [
            workloads.Workload(workloads.DIGITS_CNN, 512),
            workloads.Workload(workloads.RESNET20, 128),
        ]
        optimizers = ("momentum", "adam")
        schedule = {workloads.DIGITS_CNN: (16, 8), workloads.RESNET20: (6, 3)}
        floor_schedule = (10, 10)
    cases, floors = [], []
    for workload in cases_to_run:
        rounds, steps = schedule[workload.model]
        shapes = [v.shape for v in workloads.build_workload_model(workload).trainable_variables]
        for jit_compile in (False, True):
            for optimizer in optimizers:
                case = measure_noise_overhead(
                    workload,
                    optimizer=optimizer,
                    jit_compile=jit_compile,
                    rounds=rounds,
                    steps_per_round=steps,
                )
                cases.append(case)
                harness.log(
                    f"noise {workload.model} B={workload.batch_size} {optimizer} "
                    f"xla={jit_compile}: {case['ratio']:.3f}"
                )
            floor = measure_noise_floor(
                shapes,
                jit_compile=jit_compile,
                rounds=floor_schedule[0],
                steps_per_round=floor_schedule[1],
            )
            floor["model"] = workload.model
            floors.append(floor)
    for case in cases:
        floor = next(f for f in floors if f["model"] == case["model"] and f["xla"] == case["xla"])
        case["floor_philox_ns_per_param"] = floor["philox_ns_per_param"]
        case["overhead_vs_floor"] = case["overhead_ns_per_param"] / floor["philox_ns_per_param"]
    return {"cases": cases, "floors": floors}
