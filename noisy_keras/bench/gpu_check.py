r"""Benchmark part "gpu_check": every registry model mirrored with XLA per replica, mixed precision.

    python -m noisy_keras.bench --parts=gpu_check --out=gpu_check.json   # on a machine with GPUs
    python -m noisy_keras.bench --parts=gpu_check --quick                 # CPU smoke run (CI)

For each model of the registry (`mlp`, `cnn`, `cnn1d`, `cnn1d_bn`, `resnet20`, `resnet50`;
`--quick`: `mlp` only) it trains a few steps with `enable_replica_xla` under
`MirroredStrategy` over every GPU (without GPUs, `ENGINE_DEVICES` logical CPU
devices) in `mixed_float16`, with `NoisyOptimizer(SGD(momentum=0.9))`, and
checks:

* XLA compiled: the per-replica train function is a `jit_compile=True`
  `tf.function` that ran (such a function runs only compiled) and was traced;
* the replicas are identical: every copy of every mirrored variable (weights,
  BatchNormalization statistics, dropout seeds, optimizer slots, loss scale)
  is equal bit for bit;
* the loss is finite at every step, and a `LossScaleOptimizer` scaled it.

Then it measures examples/s of the engine against Keras `fit` without XLA under
the same strategy and Keras `fit(jit_compile=True)` on one device
(`noisy_keras.bench.engine.measure_engine`), in the same precision. A failed
check is reported in the table and makes the command exit with status 1.

`mixed_float16` is what GPUs run fast. It also runs on CPU (emulated, slowly),
where the smoke run uses it so that the loss-scale path is exercised.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from noisy_keras.bench import harness, workloads
from noisy_keras.bench.engine import ENGINE_DEVICES, measure_engine
from noisy_keras.engine import distribute
from noisy_keras.engine import steps as replica_xla
from noisy_keras.noise.optimizer import NoisyOptimizer
from noisy_keras.run import config

PRECISION = "mixed_float16"
REGISTRY = config.MODEL_NAMES
PER_REPLICA_BATCH = {
    "mlp": 256, "cnn": 256, "cnn1d": 256, "cnn1d_bn": 256, "resnet20": 128, "resnet50": 64
}  # fmt: skip
"""Examples per replica and step (the global batch is this times the replicas)."""
THROUGHPUT_CONFIGS = ("engine_mirrored_xla", "keras_mirrored", "keras_single_xla")


def _strategy():
    gpus = tf.config.list_logical_devices("GPU")
    return distribute.make_strategy("mirrored", len(gpus) if gpus else ENGINE_DEVICES)


def _copies(variable) -> list:
    value = variable.value
    if isinstance(value, tf.distribute.DistributedValues):
        return [np.asarray(c) for c in value.values]
    return [np.asarray(value)]


def replicas_identical(model: keras.Model) -> bool:
    """Whether every copy of every model and optimizer variable is equal bit for bit."""
    for variable in model.variables + model.optimizer.variables:
        copies = _copies(variable)
        if any(not np.array_equal(c, copies[0], equal_nan=True) for c in copies[1:]):
            return False
    return True


def check_model(name: str, *, steps: int, per_replica_batch: int) -> dict:
    """Trains `name` for `steps` steps with the engine in mixed precision; returns the checks.

    Returns:
        {"model", "replicas", "global_batch_size", "precision", "xla_compiled",
        "train_traces", "replicas_identical", "loss_finite", "loss_scaled",
        "losses", "ok"}.
    """
    previous_policy = keras.config.dtype_policy()
    keras.utils.clear_session()  # resets the dtype policy: set it after
    keras.config.set_dtype_policy(PRECISION)
    try:
        strategy = _strategy()
        replicas = int(strategy.num_replicas_in_sync)
        workload = workloads.Workload(name, per_replica_batch * replicas)
        x, y = workloads.batch_arrays(workload, num_batches=steps)
        with strategy.scope():
            model = workloads.build_workload_model(workload)
            model.compile(
                optimizer=NoisyOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), seed=0),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        replica_xla.enable_replica_xla(model, jit_compile=True)
        losses = []

        class StepLoss(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                losses.append(float(logs["loss"]))

        model.fit(
            x,
            y,
            batch_size=workload.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[StepLoss()],
        )
        steps_object = replica_xla.replica_steps(model)
        traces = replica_xla.replica_xla_functions(model)["train"].experimental_get_tracing_count()
        result = {
            "model": name,
            "replicas": replicas,
            "global_batch_size": workload.batch_size,
            "precision": keras.config.dtype_policy().name,
            "xla_compiled": bool(steps_object.jit_compile and traces >= 1),
            "train_traces": int(traces),
            "replicas_identical": replicas_identical(model),
            "loss_finite": len(losses) == steps and all(math.isfinite(v) for v in losses),
            "loss_scaled": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
            "losses": losses,
        }
    finally:
        keras.config.set_dtype_policy(previous_policy)
    checks = ("xla_compiled", "replicas_identical", "loss_finite", "loss_scaled")
    result["ok"] = all(result[c] for c in checks)
    return result


def part(quick: bool) -> dict:
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if quick:
        names, steps, per_replica, rounds, timed = ("mlp",), 2, {"mlp": 16}, 2, 2
    elif gpus:
        names, steps, per_replica, rounds, timed = REGISTRY, 5, PER_REPLICA_BATCH, 4, 5
    else:  # float16 without XLA is emulated on CPU: Keras' mirrored path is very slow there
        names, steps, per_replica, rounds, timed = REGISTRY, 3, dict.fromkeys(REGISTRY, 16), 2, 2
    cases = []
    for name in names:
        check = check_model(name, steps=steps, per_replica_batch=per_replica[name])
        harness.log(f"gpu_check {name}: {'ok' if check['ok'] else 'FAILED'}")
        throughput = measure_engine(
            workloads.Workload(name, check["global_batch_size"]),
            configs=THROUGHPUT_CONFIGS,
            rounds=rounds,
            steps_per_round=timed,
            precision=PRECISION,
        )
        cases.append({**check, "throughput": throughput})
    failed = [c["model"] for c in cases if not c["ok"]]
    return {"gpus": gpus, "precision": PRECISION, "cases": cases, "failed": failed}
