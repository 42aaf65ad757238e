"""Benchmark part "engine": examples/s of the per-replica XLA engine vs Keras' own paths.

`enable_replica_xla` under MirroredStrategy vs Keras `fit` under
MirroredStrategy without XLA vs Keras `fit(jit_compile=True)` on one device;
same model, same global batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from noisy_keras.bench import harness, workloads
from noisy_keras.engine import distribute
from noisy_keras.engine import steps as replica_xla
from noisy_keras.noise.optimizer import NoisyOptimizer

ENGINE_DEVICES = 2
"""Logical CPU devices the engine part splits the CPU into when there is no GPU."""


ENGINE_CONFIGS = {
    "engine_mirrored_xla": "enable_replica_xla(jit_compile=True), MirroredStrategy",
    "keras_mirrored": "Keras fit, MirroredStrategy, no XLA",
    "keras_single_xla": "Keras fit(jit_compile=True), one device",
    "engine_mirrored_no_xla": "enable_replica_xla(jit_compile=False), MirroredStrategy",
    "keras_single": "Keras fit, one device, no XLA",
}


def _engine_strategy(mirrored: bool):

    if not mirrored:
        return distribute.make_strategy("default")
    gpus = tf.config.list_logical_devices("GPU")
    return distribute.make_strategy("mirrored", len(gpus) if gpus else ENGINE_DEVICES)


# How each configuration is built: (MirroredStrategy, Keras' jit_compile, the engine's
# jit_compile or None without the engine). Spelled out, never parsed from the name: a name
# ending in "_xla" is also the end of "_no_xla".
CONFIG_SETTINGS = {
    "engine_mirrored_xla": (True, False, True),
    "keras_mirrored": (True, False, None),
    "keras_single_xla": (False, True, None),
    "engine_mirrored_no_xla": (True, False, False),
    "keras_single": (False, False, None),
}


def _engine_model(config: str, workload: workloads.Workload):

    mirrored, keras_xla, engine_xla = CONFIG_SETTINGS[config]
    strategy = _engine_strategy(mirrored)
    with strategy.scope():
        model = workloads.build_workload_model(workload)
        model.compile(
            optimizer=NoisyOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), seed=0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=keras_xla,
        )
    if engine_xla is not None:
        replica_xla.enable_replica_xla(model, jit_compile=engine_xla)
    return model, strategy


def compiled_as(model, strategy) -> dict:
    """How a benchmark model runs: replicas, Keras' own XLA, the engine and its XLA."""
    engine = getattr(model, replica_xla.ATTRIBUTE, None)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "keras_xla": bool(model.jit_compile),  # enable_replica_xla sets it to False
        "engine": engine is not None,
        "engine_xla": engine is not None and engine.jit_compile,
    }


def measure_engine(
    workload: workloads.Workload,
    *,
    configs: Sequence[str],
    rounds: int,
    steps_per_round: int,
    precision: str | None = None,
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
    timed. Configurations are those of `ENGINE_CONFIGS`. `precision` (e.g.
    "mixed_float16") is the Keras dtype policy the models are built under,
    restored afterwards; None keeps the current one.

    Returns:
        {"model", "global_batch_size", "replicas", "devices", "configs": [...],
        ratios of the engine to the two Keras paths}.
    """

    unknown = [c for c in configs if c not in ENGINE_CONFIGS]
    if unknown:
        raise ValueError(f"Unknown engine configs {unknown}; allowed: {', '.join(ENGINE_CONFIGS)}.")
    previous_policy = keras.config.dtype_policy()
    keras.utils.clear_session()  # also resets the dtype policy: set it after
    keras.config.set_dtype_policy(precision or previous_policy)
    try:
        return _measure_engine(workload, configs, rounds, steps_per_round)
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _measure_engine(workload, configs, rounds, steps_per_round) -> dict:
    x, y = workloads.batch_arrays(workload, num_batches=2)
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
        step_s = harness.median(times[config])
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
        "precision": keras.config.dtype_policy().name,
        "devices": devices,
        "configs": rows,
    }
    engine = by_name.get("engine_mirrored_xla")
    for other in ("keras_mirrored", "keras_single_xla"):
        if engine and other in by_name:
            ratio = engine["examples_per_s"] / by_name[other]["examples_per_s"]
            result[f"engine_vs_{other}"] = ratio
    plain = by_name.get("engine_mirrored_no_xla")  # the engine's own cost, XLA aside
    if plain and "keras_mirrored" in by_name:
        ratio = plain["examples_per_s"] / by_name["keras_mirrored"]["examples_per_s"]
        result["engine_no_xla_vs_keras_mirrored"] = ratio
    return result


def part(quick: bool) -> dict:
    required = ["engine_mirrored_xla", "keras_mirrored", "keras_single_xla"]
    if quick:
        runs = [(workloads.Workload(workloads.DIGITS_MLP, 64), required, 2, 2)]
    else:
        runs = [
            (workloads.Workload(workloads.DIGITS_CNN, 512), list(ENGINE_CONFIGS), 8, 6),
            (
                workloads.Workload(workloads.RESNET20, 128),
                [*required, "engine_mirrored_no_xla"],
                4,
                3,
            ),
        ]
    results = []
    for workload, configs, rounds, steps in runs:
        result = measure_engine(workload, configs=configs, rounds=rounds, steps_per_round=steps)
        results.append(result)
        harness.log(f"engine {workload.model} B={workload.batch_size}: done")
    return {"cases": results}
