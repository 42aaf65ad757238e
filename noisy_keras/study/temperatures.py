"""The noise temperature each cell of a grid produces, measured at one cell's weights.

`write_reports(..., noise_temperature_at=CELL)` (`noisy_keras.study.reports`)
writes these rows to noise_temperature.csv/.md.
"""

from __future__ import annotations

from noisy_keras.engine.rundir import RunDir
from noisy_keras.run import config as config_lib
from noisy_keras.run.rundir_rules import read_run_config
from noisy_keras.study import grid as grid_lib

__all__ = ["noise_temperature_markdown", "noise_temperature_rows"]


def _cell_noise(config: config_lib.TrainConfig) -> tuple[str, int]:
    """The `noise_temperature` kind of a run's noise and the small batch it compares with."""
    noise = grid_lib.Noise.of_config(config)
    if noise.kind in ("matched", "multiplicative"):
        return noise.kind, noise.batch_size
    return ("white" if noise.alpha else "none"), config.base_batch_size


def noise_temperature_rows(
    rows: list[dict], at_cell: str, num_draws: int = 200, max_examples: int | None = None
) -> list[dict]:
    """The noise temperature each cell's method produces, against its small batch's.

    For every finished seed of `at_cell`, at two points, the weights at
    initialization and that run's final weights, the per-example gradients of
    the whole training set are computed once; for every cell, the noise of its
    update direction (batch size, noise kind and size, learning-rate rule, read
    from one of its runs' flags.txt) is then measured with
    `noisy_keras.analysis.noise_temperature.noise_temperatures`: the ratio of
    eta_B E|u - g|^2 to eta_b E|g_b - g|^2 (1: the small batch's noise). The
    white noise is taken at update 0 at initialization and at the run's last
    update (epochs x floor(N / B)) at the final weights. `max_examples` limits
    the examples to the first ones of the training split (the per-example
    gradients take N x parameters x 8 bytes).

    Returns:
        One row per (cell, seed of `at_cell`, point): ratio and its standard error.
    """
    import keras

    from noisy_keras.analysis import gradient_noise, noise_temperature
    from noisy_keras.noise import temperature
    from noisy_keras.run import recipe

    done = [r for r in rows if r["status"] == "done"]
    configs = {}
    for r in done:
        configs.setdefault(r["cell"], read_run_config(r["workdir"]))
    at_runs = [r for r in done if r["cell"] == at_cell]
    if not at_runs:
        raise ValueError(
            f"noise temperature at {at_cell!r}: no finished runs; cells: "
            f"{', '.join(sorted(configs))}."
        )
    out = []
    for run in at_runs:
        run_config = read_run_config(run["workdir"])
        dataset = recipe.load_data(run_config)
        x, y = dataset.train_sample(min(dataset.num_train, max_examples or dataset.num_train))
        for point in ("init", "final"):
            keras.utils.clear_session()
            if point == "init":
                model = recipe.make_model(run_config, dataset)
            else:
                model = keras.models.load_model(RunDir(run["workdir"]).model_path, compile=False)
            gradients = gradient_noise.per_example_gradients(model, x, y)
            for cell, config in configs.items():
                kind, small = _cell_noise(config)
                step = 0 if point == "init" else config.epochs * (len(y) // config.batch_size)
                multiplier = temperature.lr_multiplier_for_rule(
                    config.lr_scaling, config.batch_size, config.base_batch_size
                )
                result = noise_temperature.noise_temperatures(
                    gradients,
                    batch_size=config.batch_size,
                    small_batch_size=small,
                    learning_rate=config.base_learning_rate,
                    lr_multiplier=multiplier,
                    kinds=(kind,),
                    alpha=config.noise_alpha,
                    gamma=config.noise_gamma,
                    step=step,
                    num_draws=num_draws,
                    seed=run["seed"],
                )[kind]
                out.append(
                    {
                        "cell": cell,
                        "at": f"{at_cell} seed {run['seed']}",
                        "seed": run["seed"],
                        "point": point,
                        "ratio": result.ratio,
                        "ratio_standard_error": result.ratio_standard_error,
                        "predicted_ratio": config.base_learning_rate
                        * multiplier
                        * result.predicted
                        / result.target,
                    }
                )
    return out


def noise_temperature_markdown(entries: list[dict]) -> str:
    """Per cell and point: mean over seeds of the ratio, with its 95% CI (Student t)."""
    from noisy_keras.analysis import stats

    groups = {}
    for e in entries:
        groups.setdefault((e["cell"], e["point"]), []).append(e)
    lines = [
        "Noise temperature of each cell's update direction / small batch's (1 = restored), "
        "mean over seeds, 95% CI; predicted from the closed forms:",
        "",
        "| cell | at | n | measured ratio | predicted ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for (cell, point), members in sorted(groups.items()):
        s = stats.summarize([m["ratio"] for m in members])
        predicted = sum(m["predicted_ratio"] for m in members) / len(members)
        ci = f" ± {s.half_width:.3g}" if len(members) > 1 else ""
        lines.append(f"| {cell} | {point} | {s.count} | {s.mean:.3g}{ci} | {predicted:.3g} |")
    return "\n".join(lines) + "\n"
