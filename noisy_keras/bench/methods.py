"""Benchmark part "methods": each compared method's update time vs plain SGD, side by side.

One model per method (same seed, same data), each trained by the engine
(`enable_replica_xla`) on one device, SGD with momentum inside:

* sgd: the plain step, the reference;
* sam, adaptive_sam: `enable_sam` (rho 0.05 / 0.5), a second forward and
  backward pass in the same XLA core;
* penalty_finite_difference, penalty_double_backprop:
  `enable_gradient_norm_penalty` (lambda 0.01) both ways;
* ema: Keras' `use_ema` on the optimizer (one more multiply-add per weight).

Timed by `noise_kinds.update_time_rows`: alternating rounds, medians, ratios
to sgd's median.
"""

from __future__ import annotations

import keras

from noisy_keras.bench import harness, workloads
from noisy_keras.bench.noise_kinds import update_time_rows
from noisy_keras.engine import methods
from noisy_keras.engine import steps as replica_xla

METHODS = (
    "sgd",
    "sam",
    "adaptive_sam",
    "penalty_finite_difference",
    "penalty_double_backprop",
    "ema",
)

_ENABLE = {
    "sam": lambda m: methods.enable_sam(m, rho=0.05),
    "adaptive_sam": lambda m: methods.enable_sam(m, rho=0.5, adaptive=True),
    "penalty_finite_difference": lambda m: methods.enable_gradient_norm_penalty(m, strength=0.01),
    "penalty_double_backprop": lambda m: methods.enable_gradient_norm_penalty(
        m, strength=0.01, gradient="double_backprop"
    ),
}


def _method_model(method: str, workload: workloads.Workload, jit_compile: bool):
    model = workloads.build_workload_model(workload)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, use_ema=method == "ema")
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    replica_xla.enable_replica_xla(model, jit_compile=jit_compile)
    if method in _ENABLE:
        _ENABLE[method](model)
    return model


def measure_methods(
    workload: workloads.Workload, *, jit_compile: bool = True, rounds: int, steps_per_round: int
) -> dict:
    """Median update time of each method and its ratio to plain SGD's (`update_time_rows`).

    Returns:
        {"model", "batch_size", "xla", "methods": [{"kind", "update_ms", "ratio",
        "overhead_pct", "updates_timed"}]}.
    """
    keras.utils.clear_session()
    models = {method: _method_model(method, workload, jit_compile) for method in METHODS}
    rows = update_time_rows(
        models, workload, rounds=rounds, steps_per_round=steps_per_round, reference="sgd"
    )
    return {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "xla": jit_compile,
        "methods": rows,
    }


def part(quick: bool) -> dict:
    if quick:
        runs = [(workloads.Workload(workloads.DIGITS_MLP, 64), True, 2, 2)]
    else:
        runs = [(workloads.Workload(workloads.DIGITS_CNN, 512), True, 24, 2)]
    cases = []
    for workload, jit_compile, rounds, steps in runs:
        case = measure_methods(
            workload, jit_compile=jit_compile, rounds=rounds, steps_per_round=steps
        )
        cases.append(case)
        ratios = ", ".join(f"{row['kind']} {row['ratio']:.3f}" for row in case["methods"])
        harness.log(f"methods {workload.model} B={workload.batch_size} xla={jit_compile}: {ratios}")
    return {"cases": cases}
