"""Benchmark part "noise_kinds": the engine's step time with each noise kind vs none.

One model per kind (same seed, same data), each trained by the engine
(`enable_replica_xla`) on one device:

* none: SGD with momentum alone;
* white: `NoisyOptimizer` (the paper's noise, alpha = 1e-5);
* matched: `MatchedNoiseOptimizer` at b = `SMALL_BATCH` (without accumulation
  each replica's batch is computed as two halves in one XLA core, and tr(Sigma)
  is estimated from them and observed once per update);
* multiplicative: `enable_multiplicative_noise` at b = `SMALL_BATCH` (n Philox
  draws and a multiply inside the core).

Steps are timed inside `model.fit` (a callback takes the time at the end of
every batch) in alternating rounds, as in the engine part; each kind's median
step time is divided by none's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from noisy_keras.bench import harness, workloads
from noisy_keras.engine import steps as replica_xla
from noisy_keras.noise.matched import MatchedNoiseOptimizer
from noisy_keras.noise.multiplicative import enable_multiplicative_noise
from noisy_keras.noise.optimizer import NoisyOptimizer

KINDS = ("none", "white", "matched", "multiplicative")
SMALL_BATCH = 32
"""b of the matched and multiplicative kinds (s^2 = B/b - 1 at no learning-rate scaling)."""


def _kind_model(kind: str, workload: workloads.Workload, jit_compile: bool, accumulation: int):
    model = workloads.build_workload_model(workload)
    inner = workloads.inner_optimizer("momentum")
    optimizer = {
        "none": lambda: inner,
        "white": lambda: NoisyOptimizer(inner, alpha=1e-5, seed=0),
        "matched": lambda: MatchedNoiseOptimizer(
            inner, batch_size=workload.batch_size, small_batch_size=SMALL_BATCH, seed=0
        ),
        "multiplicative": lambda: inner,
    }[kind]()
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    if kind == "multiplicative":
        enable_multiplicative_noise(
            model, batch_size=workload.batch_size, small_batch_size=SMALL_BATCH, seed=0
        )
    return replica_xla.enable_replica_xla(
        model, jit_compile=jit_compile, accumulation_steps=accumulation
    )


class _StepClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def update_time_rows(
    models: dict,
    workload: workloads.Workload,
    *,
    accumulation_steps: int = 1,
    rounds: int,
    steps_per_round: int,
    reference: str,
) -> list[dict]:
    """Median time of one parameter update of each model, and its ratio to `reference`'s.

    An update is one `fit` step, or k of them (micro-batches of B / k) with
    accumulation; its time runs from the end of the previous update's last
    step to the end of its own. Each round runs `steps_per_round` timed steps
    (a multiple of k) of every model, after one untimed update, in alternating
    order of the models; each model first runs 2 untimed updates (tracing, XLA).

    Args:
        models: name -> a compiled model (through the engine, or Keras' own `fit`).
        workload: the data's workload (`workloads.batch_arrays`).
        accumulation_steps: k, the models' engine accumulation.
        rounds: rounds of every model.
        steps_per_round: timed steps per model per round.
        reference: the name whose median is the ratios' denominator.

    Returns:
        [{"kind", "update_ms", "ratio", "overhead_pct", "updates_timed"}], in `models`' order.
    """
    if steps_per_round % accumulation_steps:
        raise ValueError(
            f"steps_per_round={steps_per_round} must be a multiple of "
            f"accumulation_steps={accumulation_steps} (whole updates)."
        )
    x, y = workloads.batch_arrays(workload)
    step_batch = workload.batch_size // accumulation_steps
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(step_batch, drop_remainder=True)
    ).prefetch(2)
    names = list(models)
    for name in names:  # trace and compile, untimed (k steps: every micro-batch's function)
        models[name].fit(dataset, epochs=1, steps_per_epoch=2 * accumulation_steps, verbose=0)

    def one_fit(name):
        clock = _StepClock()
        models[name].fit(
            dataset,
            epochs=1,
            steps_per_epoch=steps_per_round + accumulation_steps,
            verbose=0,
            callbacks=[clock],
        )
        ends = clock.ends[accumulation_steps - 1 :: accumulation_steps]  # update boundaries
        return [b - a for a, b in zip(ends[:-1], ends[1:])]

    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            times[name].extend(one_fit(name))
    base = harness.median(times[reference])
    rows = []
    for name in names:
        step = harness.median(times[name])
        rows.append(
            {
                "kind": name,
                "update_ms": step * 1e3,
                "ratio": step / base,
                "overhead_pct": 100.0 * (step / base - 1.0),
                "updates_timed": len(times[name]),
            }
        )
    return rows


def measure_noise_kinds(
    workload: workloads.Workload,
    *,
    kinds: Sequence[str] = KINDS,
    jit_compile: bool = True,
    accumulation_steps: int = 1,
    rounds: int,
    steps_per_round: int,
) -> dict:
    """Median time of one parameter update with each noise kind, and its ratio to none's.

    Timed by `update_time_rows` (alternating rounds, update boundaries under
    accumulation).

    Returns:
        {"model", "batch_size", "xla", "accumulation_steps", "kinds": [{"kind",
        "update_ms", "ratio", "overhead_pct", "updates_timed"}]}.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or "none" not in kinds:
        raise ValueError(f"kinds must include 'none' and be from {KINDS}; received {kinds!r}.")
    keras.utils.clear_session()
    models = {kind: _kind_model(kind, workload, jit_compile, accumulation_steps) for kind in kinds}
    rows = update_time_rows(
        models,
        workload,
        accumulation_steps=accumulation_steps,
        rounds=rounds,
        steps_per_round=steps_per_round,
        reference="none",
    )
    return {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "xla": jit_compile,
        "accumulation_steps": accumulation_steps,
        "kinds": rows,
    }


def part(quick: bool) -> dict:
    if quick:
        runs = [(workloads.Workload(workloads.DIGITS_MLP, 64), True, 1, 2, 2)]
    else:
        # Many short rounds: on a shared machine a load burst then falls on every kind (12
        # rounds of 8 steps once measured "none" 9-13% slower than all the others).
        cnn = workloads.Workload(workloads.DIGITS_CNN, 512)
        runs = [(cnn, True, 1, 30, 2), (cnn, False, 1, 30, 2), (cnn, False, 2, 24, 4)]
    cases = []
    for workload, jit_compile, k, rounds, steps in runs:
        case = measure_noise_kinds(
            workload,
            jit_compile=jit_compile,
            accumulation_steps=k,
            rounds=rounds,
            steps_per_round=steps,
        )
        cases.append(case)
        ratios = ", ".join(f"{row['kind']} {row['ratio']:.3f}" for row in case["kinds"])
        harness.log(
            f"noise kinds {workload.model} B={workload.batch_size} xla={jit_compile} k={k}: "
            f"{ratios}"
        )
    return {"cases": cases}
