r"""Benchmarks: what the noise costs, what the engine gains, time to accuracy, memory.

    python -m noisy_keras.bench                      # everything (10-20 min on 2 CPU cores)
    python -m noisy_keras.bench --quick              # smoke run (well under a minute)
    noisy-keras-bench --parts=noise,memory --out=bench.json

Prints one Markdown table per part and writes every number to `--out` (JSON).

Figures taken on shared machines move with the load of other processes, so
every comparison is a ratio of medians measured side by side in one process:
the variants compared are run in alternating blocks (A B B A A B ...), so a
burst of outside load falls on both. The load average before and after each
part is recorded with it.

Parts:
    noise             step time of `NoisyOptimizer(inner)` / `inner` alone (SGD with
                      momentum, Adam), digits CNN at B=512 and ResNet-20 at B=128
                      (synthetic 32x32x3 inputs), one device, with and without XLA;
                      the overhead per parameter next to its floor (drawing as many
                      normals with `tf.random.stateless_normal` alone, one elementwise
                      pass over the parameters).
    engine            examples/s of `training.enable_replica_xla` under MirroredStrategy
                      vs Keras `fit` under MirroredStrategy without XLA vs Keras
                      `fit(jit_compile=True)` on one device; same model, global batch.
    time_to_accuracy  wall-clock time and steps to first reach a validation accuracy
                      with B=32 and with a large batch with and without noise, several
                      seeds (`noisy_keras.train.train`, the main job).
    memory            peak resident memory of a noisy vs a bare training process.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import app, flags

PART_NAMES = ("noise", "engine", "time_to_accuracy", "memory")
ENGINE_DEVICES = 2

__all__ = [
    "PART_NAMES",
    "interleaved_step_times",
    "measure_engine",
    "measure_memory",
    "measure_noise_floor",
    "measure_noise_overhead",
    "measure_time_to_accuracy",
    "memory_workload",
    "peak_rss_bytes",
    "run_benchmarks",
]


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _spread(values: Sequence[float]) -> dict:
    """Median, min and max of `values` (None entries, e.g. 'never reached', left out)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": _median(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


def interleaved_step_times(
    steps: dict[str, Callable[[], object]], *, rounds: int, steps_per_round: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating blocks.

    Rule: after `warmup` untimed calls of each function (tracing, XLA
    compilation, first-touch allocation), `rounds` rounds follow; in each
    round every function is called `steps_per_round` times in a row, each call
    timed on its own with `time.perf_counter`. The order of the functions is
    reversed every other round (A B, B A, A B, ...), so neither always runs
    first after the other. Each function must block until its work is done
    (e.g. end with `.numpy()`).

    Args:
        steps: name -> function with no arguments.
        rounds: rounds, >= 1.
        steps_per_round: timed calls per function per round, >= 1.
        warmup: untimed calls per function first, >= 0.

    Returns:
        name -> list of rounds * steps_per_round durations in seconds.
    """
    for name, value, minimum in (
        ("rounds", rounds, 1),
        ("steps_per_round", steps_per_round, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; received {name}={value!r}.")
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = steps[name]
            for _ in range(steps_per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and its batch size: `cnn` or `mlp` on digits, `resnet20` on synthetic images."""

    model: str
    batch_size: int


DIGITS_CNN = "cnn"
DIGITS_MLP = "mlp"  # the smoke run's model: the fastest to compile
RESNET20 = "resnet20"


def _batch_arrays(workload: Workload, num_batches: int = 1):
    """(x, y) as NumPy arrays of num_batches * batch_size examples.

    `cnn`, `mlp`: the first digits training examples in a fixed order (real
    data, normalized as in training; up to the 1,347 training examples).
    `resnet20`: uniform [0, 1) 32x32x3 images and uniform labels of 10
    classes, from a fixed seed (the step time does not depend on the values).
    """
    import numpy as np

    n = num_batches * workload.batch_size
    if workload.model in (DIGITS_CNN, DIGITS_MLP):
        from noisy_keras import data

        digits = data.load_dataset("digits", seed=0)
        x, y = digits.train_arrays()
        if n > len(y):
            raise ValueError(
                f"batch_size * batches = {n} exceeds the {len(y)} digits training examples; "
                f"allowed: batch_size <= {len(y) // num_batches}."
            )
        return x[:n], y[:n]
    if workload.model == RESNET20:
        rng = np.random.default_rng(0)
        return (
            rng.random((n, 32, 32, 3), dtype=np.float32),
            rng.integers(0, 10, size=n).astype("int32"),
        )
    raise ValueError(
        f"Unknown workload model={workload.model!r}; allowed: {DIGITS_CNN!r}, {DIGITS_MLP!r}, "
        f"{RESNET20!r}."
    )


def _build(workload: Workload):
    from noisy_keras import models

    input_shape = (32, 32, 3) if workload.model == RESNET20 else (8, 8, 1)
    return models.build_model(workload.model, input_shape=input_shape, num_classes=10, seed=0)


def _inner_optimizer(name: str):
    import keras

    if name == "momentum":
        return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=1e-3)
    raise ValueError(f"Unknown optimizer={name!r}; allowed: 'momentum', 'adam'.")


def _train_step(model, optimizer, jit_compile: bool):
    """One SGD step as a `tf.function`: forward, loss, gradients, `optimizer.apply`.

    The whole step, optimizer update and noise included, is one XLA
    computation when `jit_compile` is True (what `model.compile(jit_compile=
    True)` does on one device).
    """
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def _count_parameters(model) -> int:
    return int(sum(int(v.shape.num_elements()) for v in model.trainable_variables))


# ---------------------------------------------------------------------------
# Part 1: noise overhead
# ---------------------------------------------------------------------------


def measure_noise_overhead(
    workload: Workload,
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
    import keras
    import tensorflow as tf

    from noisy_keras import NoisyOptimizer

    keras.utils.clear_session()
    model = _build(workload)
    x, y = _batch_arrays(workload)
    x, y = tf.constant(x), tf.constant(y)
    bare = _train_step(model, _inner_optimizer(optimizer), jit_compile)
    noisy = _train_step(
        model, NoisyOptimizer(_inner_optimizer(optimizer), alpha=alpha, seed=0), jit_compile
    )
    times = interleaved_step_times(
        {"bare": lambda: bare(x, y).numpy(), "noisy": lambda: noisy(x, y).numpy()},
        rounds=rounds,
        steps_per_round=steps_per_round,
    )
    params = _count_parameters(model)
    bare_s, noisy_s = _median(times["bare"]), _median(times["noisy"])
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

    * `unit_noise`: this package's draw, `noise.unit_noise(shapes, seed, t)`,
      added to the variables (what NoisyOptimizer does per step, minus the
      gradient read);
    * `philox`: `tf.random.stateless_normal([P], alg="philox")`, the floor;
    * `auto_select`: the same with TensorFlow's default `alg="auto_select"`;
    * `elementwise`: one pass over P floats, `out = x + 1`.

    Returns:
        {"params", "xla", "<name>_ns_per_param" for each, "unit_noise_vs_philox"}.
    """
    import tensorflow as tf

    from noisy_keras import noise

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
        draws = noise.unit_noise(shapes, seed=0, step=step.assign_add(1))
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
    times = interleaved_step_times(
        {name: (lambda f=f: f().numpy()) for name, f in functions.items()},
        rounds=rounds,
        steps_per_round=steps_per_round,
    )
    result = {"params": params, "xla": jit_compile}
    for name in functions:
        result[f"{name}_ns_per_param"] = _median(times[name]) * 1e9 / params
    result["unit_noise_vs_philox"] = (
        result["unit_noise_ns_per_param"] / result["philox_ns_per_param"]
    )
    return result


def _noise_part(quick: bool) -> dict:
    if quick:
        workloads = [Workload(DIGITS_MLP, 64)]
        optimizers = ("momentum",)
        schedule = {DIGITS_MLP: (2, 2)}
        floor_schedule = (2, 2)
    else:
        workloads = [Workload(DIGITS_CNN, 512), Workload(RESNET20, 128)]
        optimizers = ("momentum", "adam")
        schedule = {DIGITS_CNN: (16, 8), RESNET20: (6, 3)}
        floor_schedule = (10, 10)
    cases, floors = [], []
    for workload in workloads:
        rounds, steps = schedule[workload.model]
        shapes = [v.shape for v in _build(workload).trainable_variables]
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
                _log(
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


# ---------------------------------------------------------------------------
# Part 2: engine throughput
# ---------------------------------------------------------------------------

ENGINE_CONFIGS = {
    "engine_mirrored_xla": "enable_replica_xla(jit_compile=True), MirroredStrategy",
    "keras_mirrored": "Keras fit, MirroredStrategy, no XLA",
    "keras_single_xla": "Keras fit(jit_compile=True), one device",
    "engine_mirrored_no_xla": "enable_replica_xla(jit_compile=False), MirroredStrategy",
    "keras_single": "Keras fit, one device, no XLA",
}


def _engine_strategy(mirrored: bool):
    import tensorflow as tf

    from noisy_keras import distribute

    if not mirrored:
        return distribute.make_strategy("default")
    gpus = tf.config.list_logical_devices("GPU")
    return distribute.make_strategy("mirrored", len(gpus) if gpus else ENGINE_DEVICES)


def _engine_model(config: str, workload: Workload):
    import keras

    from noisy_keras import NoisyOptimizer, training

    mirrored = "mirrored" in config
    strategy = _engine_strategy(mirrored)
    with strategy.scope():
        model = _build(workload)
        model.compile(
            optimizer=NoisyOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), seed=0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=config == "keras_single_xla",
        )
    if config.startswith("engine"):
        training.enable_replica_xla(model, jit_compile=config.endswith("_xla"))
    return model, strategy


def measure_engine(
    workload: Workload, *, configs: Sequence[str], rounds: int, steps_per_round: int
) -> dict:
    """Training throughput (examples/s) of Keras `fit` in several configurations.

    Every configuration trains the same model (same seed) with
    `NoisyOptimizer(SGD(momentum=0.9))` on the same global batch, streamed by
    `tf.data` from the same arrays. Each round calls `model.fit` for
    `steps_per_round + 1` steps per configuration, in alternating order; a
    callback takes the time at the end of every batch, and the differences
    are the step times (the first step of each `fit`, which includes
    creating the iterator, is not timed). Throughput = global batch / median
    step time. The first `fit` of each model (tracing, compilation) is not
    timed. Configurations are those of `ENGINE_CONFIGS`.

    Returns:
        {"model", "global_batch_size", "replicas", "devices", "configs": [...],
        ratios of the engine to the two Keras paths}.
    """
    import keras
    import tensorflow as tf

    unknown = [c for c in configs if c not in ENGINE_CONFIGS]
    if unknown:
        raise ValueError(f"Unknown engine configs {unknown}; allowed: {', '.join(ENGINE_CONFIGS)}.")
    keras.utils.clear_session()
    x, y = _batch_arrays(workload, num_batches=2)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .repeat()
        .batch(workload.batch_size, drop_remainder=True)
        .prefetch(2)
    )

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    models, replicas, devices = {}, {}, {}
    for config in configs:
        model, strategy = _engine_model(config, workload)
        # Trace and compile, untimed.
        model.fit(dataset, epochs=1, steps_per_epoch=2, shuffle=False, verbose=0)
        models[config] = model
        replicas[config] = int(strategy.num_replicas_in_sync)
        try:
            devices[config] = list(strategy.extended.worker_devices)
        except RuntimeError:  # the default strategy has no device list
            devices[config] = [tf.config.list_logical_devices()[0].name]

    def one_fit(config):
        clock = StepClock()
        models[config].fit(
            dataset,
            epochs=1,
            steps_per_epoch=steps_per_round + 1,
            shuffle=False,
            verbose=0,
            callbacks=[clock],
        )
        return [b - a for a, b in zip(clock.ends[:-1], clock.ends[1:])]

    times = {c: [] for c in configs}
    for r in range(rounds):
        for config in configs if r % 2 == 0 else list(reversed(configs)):
            times[config].extend(one_fit(config))
    rows = []
    for config in configs:
        step_s = _median(times[config])
        rows.append(
            {
                "config": config,
                "description": ENGINE_CONFIGS[config],
                "replicas": replicas[config],
                "step_ms": step_s * 1e3,
                "examples_per_s": workload.batch_size / step_s,
                "steps_timed": len(times[config]),
            }
        )
    by_name = {row["config"]: row for row in rows}
    result = {
        "model": workload.model,
        "global_batch_size": workload.batch_size,
        "devices": devices,
        "configs": rows,
    }
    engine = by_name.get("engine_mirrored_xla")
    for other in ("keras_mirrored", "keras_single_xla"):
        if engine and other in by_name:
            ratio = engine["examples_per_s"] / by_name[other]["examples_per_s"]
            result[f"engine_vs_{other}"] = ratio
    return result


def _engine_part(quick: bool) -> dict:
    required = ["engine_mirrored_xla", "keras_mirrored", "keras_single_xla"]
    if quick:
        runs = [(Workload(DIGITS_MLP, 64), required, 2, 2)]
    else:
        runs = [
            (Workload(DIGITS_CNN, 512), list(ENGINE_CONFIGS), 8, 6),
            (Workload(RESNET20, 128), required, 4, 3),
        ]
    results = []
    for workload, configs, rounds, steps in runs:
        result = measure_engine(workload, configs=configs, rounds=rounds, steps_per_round=steps)
        results.append(result)
        _log(f"engine {workload.model} B={workload.batch_size}: done")
    return {"cases": results}


# ---------------------------------------------------------------------------
# Part 3: time to accuracy
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AccuracyTask:
    """A dataset and model, the validation accuracy to reach, and the batches compared."""

    dataset: str
    model: str
    target_accuracy: float
    large_batch_size: int
    small_epochs: int
    large_epochs: int
    small_batch_size: int = 32


def _first_reach(rows: list[dict], target: float) -> dict | None:
    for row in rows:
        if row["val_accuracy"] >= target:
            return row
    return None


def measure_time_to_accuracy(
    task: AccuracyTask, *, seeds: Sequence[int], noise_alpha: float = 1e-5
) -> dict:
    """Wall-clock time and steps until the validation accuracy first reaches the target.

    Runs the main job (`noisy_keras.train.train`, the paper's recipe: SGD
    with momentum 0.9, learning rate 0.01 at B=32 scaled linearly, default
    step decay) for three configurations per seed: B=32 without noise, the
    large batch without noise, the large batch with noise (alpha, gamma =
    0.55). The time is the run's `wall_time_s` (seconds since the start of
    training, tracing included) at the end of the first epoch whose
    validation accuracy is >= the target; steps = (epoch + 1) x steps per
    epoch. Seeds run one after another, the three configurations in turn
    (rotated per seed). A run that never reaches the target counts as not
    reached (None) and is left out of the median.

    Returns:
        {"task": ..., "runs": [one per run], "summary": [one per configuration,
        time and steps as median, min, max over the seeds that reached]}.
    """
    from noisy_keras import data, train

    num_train = data.load_dataset(task.dataset, seed=0).num_train
    configs = [
        ("B=32", task.small_batch_size, 0.0, task.small_epochs),
        (f"B={task.large_batch_size}", task.large_batch_size, 0.0, task.large_epochs),
        (f"B={task.large_batch_size}+noise", task.large_batch_size, noise_alpha, task.large_epochs),
    ]
    runs = []
    for i, seed in enumerate(seeds):
        order = configs[i % len(configs) :] + configs[: i % len(configs)]
        for label, batch_size, alpha, epochs in order:
            config = train.TrainConfig(
                dataset=task.dataset,
                model=task.model,
                batch_size=batch_size,
                noise_alpha=alpha,
                epochs=epochs,
                seed=seed,
                xla="false",
                verbose=0,
            )
            with tempfile.TemporaryDirectory() as workdir:
                summary = train.train(config, workdir, overwrite=True)
                rows = train.read_metrics(os.path.join(workdir, "metrics.csv"))
            reached = _first_reach(rows, task.target_accuracy)
            steps_per_epoch = num_train // batch_size
            runs.append(
                {
                    "config": label,
                    "batch_size": batch_size,
                    "noise_alpha": alpha,
                    "seed": seed,
                    "epochs": epochs,
                    "status": summary["status"],
                    "final_val_accuracy": rows[-1]["val_accuracy"] if rows else None,
                    "best_val_accuracy": max(r["val_accuracy"] for r in rows) if rows else None,
                    "reached": reached is not None,
                    "epochs_to_target": reached["epoch"] + 1 if reached else None,
                    "steps_to_target": (reached["epoch"] + 1) * steps_per_epoch
                    if reached
                    else None,
                    "time_to_target_s": reached["wall_time_s"] if reached else None,
                    "run_time_s": rows[-1]["wall_time_s"] if rows else None,
                }
            )
            _log(
                f"time_to_accuracy {task.dataset} {label} seed={seed}: "
                f"{runs[-1]['time_to_target_s']}"
            )
    summary = []
    for label, batch_size, alpha, epochs in configs:
        mine = [r for r in runs if r["config"] == label]
        summary.append(
            {
                "config": label,
                "batch_size": batch_size,
                "noise_alpha": alpha,
                "epochs": epochs,
                "reached": sum(r["reached"] for r in mine),
                "seeds": len(mine),
                "time_to_target_s": _spread([r["time_to_target_s"] for r in mine]),
                "steps_to_target": _spread([r["steps_to_target"] for r in mine]),
                "best_val_accuracy": _spread([r["best_val_accuracy"] for r in mine]),
            }
        )
    return {"task": dataclasses.asdict(task), "runs": runs, "summary": summary}


def _time_to_accuracy_part(quick: bool) -> dict:
    if quick:
        tasks = [AccuracyTask("digits", "cnn", 0.15, 256, small_epochs=1, large_epochs=2)]
        seeds = [0]
    else:
        tasks = [
            AccuracyTask("digits", "cnn", 0.90, 256, small_epochs=8, large_epochs=40),
            AccuracyTask("mnist1d", "cnn1d", 0.80, 512, small_epochs=20, large_epochs=40),
        ]
        seeds = [0, 1, 2]
    return {"tasks": [measure_time_to_accuracy(task, seeds=seeds) for task in tasks]}


# ---------------------------------------------------------------------------
# Part 4: memory
# ---------------------------------------------------------------------------


def memory_workload(*, model: str, batch_size: int, steps: int, noisy: bool) -> None:
    """The training process measured by `measure_memory`: `steps` steps, no XLA.

    Builds `model`, takes one batch (see `_batch_arrays`) and runs `steps`
    train steps with SGD(momentum=0.9), wrapped in `NoisyOptimizer` when
    `noisy`.
    """
    from noisy_keras import NoisyOptimizer

    workload = Workload(model, batch_size)
    net = _build(workload)
    x, y = _batch_arrays(workload)
    optimizer = _inner_optimizer("momentum")
    if noisy:
        optimizer = NoisyOptimizer(optimizer, seed=0)
    step = _train_step(net, optimizer, jit_compile=False)
    for _ in range(steps):
        step(x, y).numpy()


def peak_rss_bytes() -> int:
    """This process' peak resident set size in bytes.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this
    program's own memory map. Not `ru_maxrss`: on Linux that starts from the
    parent's resident size at fork (the kernel carries it over at exec), so
    a child of a large process reports at least the parent's size. Elsewhere:
    `ru_maxrss` of RUSAGE_SELF (bytes on macOS, kB otherwise).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _run_children(commands: list[list[str]]) -> list[int]:
    """Runs the commands as concurrent child processes; returns the integer each prints last."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    children = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for c in commands
    ]
    values = []
    for child in children:
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(
                f"memory child {child.args!r} failed with exit code {child.returncode}:\n"
                + stderr[-2000:]
            )
        values.append(int(stdout.split()[-1]))
    return values


def measure_memory(*, model: str, batch_size: int, steps: int, repeats: int) -> dict:
    """Peak resident memory of a noisy and a bare training process, side by side.

    Each repeat starts two fresh Python processes at the same time, one
    running `memory_workload(noisy=True)`, one `noisy=False`; each prints its
    peak resident set size (`peak_rss_bytes`) as it ends. The medians
    over the repeats are reported with their ratio. The noise needs one
    float32 draw the size of the parameters plus the noisy gradients, about
    8 bytes per parameter transiently, so the ratio is close to 1.

    Returns:
        {"model", "batch_size", "steps", "repeats", "params", "bare_mb",
        "noisy_mb", "ratio", "delta_mb", "bare_samples_mb", "noisy_samples_mb"}.
    """

    def command(noisy):
        code = (
            "from noisy_keras import bench; "
            f"bench.memory_workload(model={model!r}, batch_size={batch_size}, "
            f"steps={steps}, noisy={noisy}); print(bench.peak_rss_bytes())"
        )
        return [sys.executable, "-c", code]

    bare, noisy = [], []
    for _ in range(repeats):
        noisy_peak, bare_peak = _run_children([command(True), command(False)])
        bare.append(bare_peak / 2**20)
        noisy.append(noisy_peak / 2**20)
    bare_mb, noisy_mb = _median(bare), _median(noisy)
    return {
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "params": _count_parameters(_build(Workload(model, batch_size))),
        "bare_mb": bare_mb,
        "noisy_mb": noisy_mb,
        "ratio": noisy_mb / bare_mb,
        "delta_mb": noisy_mb - bare_mb,
        "bare_samples_mb": bare,
        "noisy_samples_mb": noisy,
    }


def _memory_part(quick: bool) -> dict:
    if quick:
        runs = [(DIGITS_MLP, 64, 3, 1)]
    else:
        runs = [(DIGITS_CNN, 512, 20, 3), (RESNET20, 128, 5, 2)]
    cases = []
    for model, batch_size, steps, repeats in runs:
        cases.append(
            measure_memory(model=model, batch_size=batch_size, steps=steps, repeats=repeats)
        )
        _log(f"memory {model}: done")
    return {"cases": cases}


# ---------------------------------------------------------------------------
# Tables and driver
# ---------------------------------------------------------------------------


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(results: dict) -> str:
    """The results as Markdown tables, one per part present."""
    out = []
    noise = results.get("noise")
    if noise:
        out.append("### Noise overhead (NoisyOptimizer vs inner alone, one device)\n")
        out.append(
            _table(
                ["model", "B", "optimizer", "XLA", "bare ms", "noisy ms", "ratio",
                 "overhead %", "overhead ns/param", "floor ns/param", "vs floor"],
                [
                    [c["model"], c["batch_size"], c["optimizer"], _fmt(c["xla"]),
                     _fmt(c["bare_ms"]), _fmt(c["noisy_ms"]), _fmt(c["ratio"], 3),
                     _fmt(c["overhead_pct"], 1), _fmt(c["overhead_ns_per_param"], 1),
                     _fmt(c["floor_philox_ns_per_param"], 1), _fmt(c["overhead_vs_floor"], 2)]
                    for c in noise["cases"]
                ],
            )
        )  # fmt: skip
        out.append("\n\nFloors, ns per parameter (medians; the draw written to memory):\n")
        out.append(
            _table(
                ["params", "XLA", "unit_noise (ours)", "stateless_normal philox",
                 "stateless_normal auto_select", "elementwise pass", "ours / philox"],
                [
                    [f["params"], _fmt(f["xla"]), _fmt(f["unit_noise_ns_per_param"], 1),
                     _fmt(f["philox_ns_per_param"], 1), _fmt(f["auto_select_ns_per_param"], 1),
                     _fmt(f["elementwise_ns_per_param"], 1), _fmt(f["unit_noise_vs_philox"], 2)]
                    for f in noise["floors"]
                ],
            )
        )  # fmt: skip
        out.append("\n")
    engine = results.get("engine")
    if engine:
        for case in engine["cases"]:
            out.append(
                f"\n### Engine throughput: {case['model']}, global batch "
                f"{case['global_batch_size']}\n"
            )
            out.append(
                _table(
                    ["configuration", "replicas", "step ms", "examples/s"],
                    [
                        [r["description"], r["replicas"], _fmt(r["step_ms"]),
                         _fmt(r["examples_per_s"], 0)]
                        for r in case["configs"]
                    ],
                )
            )  # fmt: skip
            ratios = [f"{key}: {case[key]:.2f}x" for key in case if key.startswith("engine_vs_")]
            out.append("\n" + "; ".join(ratios) + "\n")
    tta = results.get("time_to_accuracy")
    if tta:
        for task_result in tta["tasks"]:
            task = task_result["task"]
            out.append(
                f"\n### Time to {task['target_accuracy']:.0%} validation accuracy: "
                f"{task['dataset']} ({task['model']})\n"
            )
            rows = []
            for s in task_result["summary"]:
                t, n, best = s["time_to_target_s"], s["steps_to_target"], s["best_val_accuracy"]
                rows.append(
                    [
                        s["config"],
                        s["epochs"],
                        f"{s['reached']}/{s['seeds']}",
                        f"{_fmt(t['median'], 1)} [{_fmt(t['min'], 1)}, {_fmt(t['max'], 1)}]",
                        f"{_fmt(n['median'], 0)} [{_fmt(n['min'], 0)}, {_fmt(n['max'], 0)}]",
                        _fmt(best["median"], 3),
                    ]
                )
            out.append(
                _table(
                    ["config", "epochs", "reached", "time s, median [min, max]",
                     "steps, median [min, max]", "best val acc (median)"],
                    rows,
                )
            )  # fmt: skip
            out.append("\n")
    memory = results.get("memory")
    if memory:
        out.append("\n### Peak resident memory (training process, no XLA)\n")
        out.append(
            _table(
                ["model", "B", "params", "bare MiB", "noisy MiB", "ratio", "delta MiB"],
                [
                    [c["model"], c["batch_size"], c["params"], _fmt(c["bare_mb"], 0),
                     _fmt(c["noisy_mb"], 0), _fmt(c["ratio"], 3), _fmt(c["delta_mb"], 1)]
                    for c in memory["cases"]
                ],
            )
        )  # fmt: skip
        out.append("\n")
    return "\n".join(out)


_PARTS = {
    "noise": _noise_part,
    "engine": _engine_part,
    "memory": _memory_part,
    "time_to_accuracy": _time_to_accuracy_part,
}


def _log(message: str) -> None:
    print(f"noisy_keras.bench: {message}", file=sys.stderr, flush=True)


def run_benchmarks(*, parts: Sequence[str] = PART_NAMES, quick: bool = False) -> dict:
    """Runs the chosen parts and returns their results with the machine's description.

    Parts run in the order noise, engine, memory, time_to_accuracy (the last
    one enables TensorFlow's op determinism, as the main job does, which would
    otherwise affect the others). For the engine part the CPU must already
    be split into `ENGINE_DEVICES` logical devices when there is no GPU
    (`distribute.configure_logical_cpus`, before TensorFlow starts).

    Args:
        parts: names from `PART_NAMES`.
        quick: the smoke-test sizes (one small case per part, few steps).

    Returns:
        {"meta": {...}, and one entry per part}.
    """
    parts = list(parts)
    unknown = [p for p in parts if p not in PART_NAMES]
    if unknown or not parts:
        raise ValueError(
            f"parts must be a non-empty list of {', '.join(PART_NAMES)}; received {parts!r}."
        )
    import keras
    import tensorflow as tf

    start = time.time()
    results = {
        "meta": {
            "quick": quick,
            "parts": parts,
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average": {},
            "part_seconds": {},
        }
    }
    for name in [p for p in _PARTS if p in parts]:
        part_start = time.time()
        load_before = _load_average()
        _log(f"{name} ...")
        results[name] = _PARTS[name](quick)
        results["meta"]["load_average"][name] = {"before": load_before, "after": _load_average()}
        results["meta"]["part_seconds"][name] = round(time.time() - part_start, 1)
    results["meta"]["seconds"] = round(time.time() - start, 1)
    return results


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def define_flags() -> None:
    """Defines the benchmark's flags (idempotent)."""
    if "parts" in flags.FLAGS:
        return
    flags.DEFINE_bool("quick", False, "Smoke-test sizes: one small case per part, few steps.")
    flags.DEFINE_string("out", "bench.json", "Where to write the results as JSON.")
    flags.DEFINE_list("parts", list(PART_NAMES), f"Parts to run, from {', '.join(PART_NAMES)}.")
    flags.register_validator(
        "parts",
        lambda v: bool(v) and all(p in PART_NAMES for p in v),
        message=f"--parts must be a comma-separated list of {', '.join(PART_NAMES)}.",
    )
    flags.register_validator("out", bool, message="--out must be a file path.")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    parts, quick, out = list(FLAGS.parts), FLAGS.quick, FLAGS.out
    # TensorFlow logs every MirroredStrategy reduction at INFO; keep the console readable.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if "engine" in parts:
        import tensorflow as tf

        from noisy_keras import distribute

        if not tf.config.list_physical_devices("GPU"):
            distribute.configure_logical_cpus(ENGINE_DEVICES)
    results = run_benchmarks(parts=parts, quick=quick)
    results["meta"]["command"] = " ".join(["python -m noisy_keras.bench", *sys.argv[1:]])
    print(format_tables(results))
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"noisy_keras.bench: wrote {out} in {results['meta']['seconds']:.0f}s")
    return 0


def run() -> None:
    """Console-script entry point (`noisy-keras-bench`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
