"""Benchmark part "memory": peak resident memory of a noisy vs a bare training process."""

from __future__ import annotations

import sys

from noisy_keras.bench import harness, workloads
from noisy_keras.noise.optimizer import NoisyOptimizer


def memory_workload(*, model: str, batch_size: int, steps: int, noisy: bool) -> None:
    """The training process measured by `measure_memory`: `steps` steps, no XLA.

    Builds `model`, takes one batch (see `_batch_arrays`) and runs `steps`
    train steps with SGD(momentum=0.9), wrapped in `NoisyOptimizer` when
    `noisy`.
    """

    workload = workloads.Workload(model, batch_size)
    net = workloads.build_workload_model(workload)
    x, y = workloads.batch_arrays(workload)
    optimizer = workloads.inner_optimizer("momentum")
    if noisy:
        optimizer = NoisyOptimizer(optimizer, seed=0)
    step = workloads.train_step(net, optimizer, jit_compile=False)
    for _ in range(steps):
        step(x, y).numpy()


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
            "from noisy_keras.bench import harness, memory; "
            f"memory.memory_workload(model={model!r}, batch_size={batch_size}, "
            f"steps={steps}, noisy={noisy}); print(harness.peak_rss_bytes())"
        )
        return [sys.executable, "-c", code]

    bare, noisy = [], []
    for _ in range(repeats):
        noisy_peak, bare_peak = harness.run_children([command(True), command(False)])
        bare.append(bare_peak / 2**20)
        noisy.append(noisy_peak / 2**20)
    bare_mb, noisy_mb = harness.median(bare), harness.median(noisy)
    return {
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "params": workloads.count_parameters(
            workloads.build_workload_model(workloads.Workload(model, batch_size))
        ),
        "bare_mb": bare_mb,
        "noisy_mb": noisy_mb,
        "ratio": noisy_mb / bare_mb,
        "delta_mb": noisy_mb - bare_mb,
        "bare_samples_mb": bare,
        "noisy_samples_mb": noisy,
    }


def part(quick: bool) -> dict:
    if quick:
        runs = [(workloads.DIGITS_MLP, 64, 3, 1)]
    else:
        runs = [(workloads.DIGITS_CNN, 512, 20, 3), (workloads.RESNET20, 128, 5, 2)]
    cases = []
    for model, batch_size, steps, repeats in runs:
        cases.append(
            measure_memory(model=model, batch_size=batch_size, steps=steps, repeats=repeats)
        )
        harness.log(f"memory {model}: done")
    return {"cases": cases}
