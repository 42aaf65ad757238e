"""Benchmark part "time_to_accuracy": wall-clock time and steps to a validation accuracy.

B=32 and a large batch with and without noise, several seeds, through the
main job (`noisy_keras.run.train.train`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence

from noisy_keras.bench import harness
from noisy_keras.data import datasets
from noisy_keras.engine.rundir import RunDir
from noisy_keras.run import config as config_lib
from noisy_keras.run import train


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

    Runs the main job (`noisy_keras.run.train.train`, the paper's recipe: SGD
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

    num_train = datasets.load_dataset(task.dataset, seed=0).num_train
    configs = [
        ("B=32", task.small_batch_size, 0.0, task.small_epochs),
        (f"B={task.large_batch_size}", task.large_batch_size, 0.0, task.large_epochs),
        (f"B={task.large_batch_size}+noise", task.large_batch_size, noise_alpha, task.large_epochs),
    ]
    runs = []
    for i, seed in enumerate(seeds):
        order = configs[i % len(configs) :] + configs[: i % len(configs)]
        for label, batch_size, alpha, epochs in order:
            config = config_lib.TrainConfig(
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
                rows = RunDir(workdir).read_metrics()
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
                    "epochs_to_target": reached["epoch"] if reached else None,  # from 1
                    "steps_to_target": reached["epoch"] * steps_per_epoch if reached else None,
                    "time_to_target_s": reached["wall_time_s"] if reached else None,
                    "run_time_s": rows[-1]["wall_time_s"] if rows else None,
                }
            )
            harness.log(
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
                "time_to_target_s": harness.spread([r["time_to_target_s"] for r in mine]),
                "steps_to_target": harness.spread([r["steps_to_target"] for r in mine]),
                "best_val_accuracy": harness.spread([r["best_val_accuracy"] for r in mine]),
            }
        )
    return {"task": dataclasses.asdict(task), "runs": runs, "summary": summary}


def part(quick: bool) -> dict:
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
