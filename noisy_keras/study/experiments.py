r"""Grids of configurations x seeds through the main job, with tables and figures.

    python -m noisy_keras.experiments --out=results/offline       # the packaged recipes
    python -m noisy_keras.experiments --out=results/offline \
        --flagfiles=repro_digits.flags,my_recipe.flags \
        --batch_sizes=32,64,128,256,512,1024 --alphas=0,1e-5,1e-3,1e-2 --seeds=5

    python -m noisy_keras.experiments --out=results/kinds --flagfiles=flags/repro_digits.flags \
        --set=lr_scaling=none --batch_sizes=512 --seeds=5 \
        --noises=none,white:1e-5,matched:32,multiplicative:32

Each cell is (flagfile, batch size, noise, method) (`noisy_keras.study.grid`); each cell runs
once per seed with `noisy_keras.run.train.train`, in `OUT/runs/<cell>/seed<k>`. A
run whose `summary.json` says "done" is never redone, so an interrupted grid
resumes where it stopped when the same command is run again (a run stopped
half-way resumes from its last checkpoint). After training, the sharpness of
each run (top Hessian eigenvalue of the training loss on a fixed subset of
training examples, Jastrzebski et al. 2018) is measured once and stored next
to it. `--same_updates` gives every batch size as many epochs' worth of updates as
the base batch, B/b times its epochs (Hoffer et al. 2017; equal update counts when
both batch sizes divide the training set, see `grid.same_updates_changes`).

`--alphas` gives white-noise cells (alpha 0 meaning no noise; the original
grid), and `--noises` any kinds: `none`, `white:ALPHA`, `matched:b`,
`multiplicative:b` (a bare `matched` takes `--default_noise_batch_size`), and the
compared methods `sam:RHO`, `asam:RHO`, `gnp:LAMBDA`, `ema:M`, alone or joined
to a noise with `+` (`white:1e-5+sam:0.05`; `grid.parse_kind`).

After its runs, the runner reports every finished run under OUT, its own and
those of earlier invocations into the same OUT (`noisy_keras.study.reports`):
results.csv, table.csv/.md, the figures, and with `--reference=CELL` the
differences of every cell from that cell with Welch's 95% CI.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from noisy_keras import _extras
from noisy_keras.engine.rundir import RunDir
from noisy_keras.run import _cli
from noisy_keras.run import config as config_lib
from noisy_keras.run import flagfile as flagfile_lib
from noisy_keras.run import train as train_lib
from noisy_keras.study import grid as grid_lib
from noisy_keras.study import reports

SHARPNESS_EXAMPLES = 512


def measure_sharpness(workdir: str, config: config_lib.TrainConfig) -> float:
    """Top Hessian eigenvalue of the training loss of a finished run (Lanczos).

    Uses the first `SHARPNESS_EXAMPLES` training examples of the run's split,
    normalized as in training, and the saved final model.
    """
    import keras

    from noisy_keras.analysis import hessian
    from noisy_keras.run import recipe

    dataset = recipe.load_data(config)
    x, y = dataset.train_sample(min(SHARPNESS_EXAMPLES, dataset.num_train))
    model = keras.models.load_model(RunDir(workdir).model_path, compile=False)
    result = hessian.hessian_eigenvalues(
        model, (x, y), k=1, max_iterations=60, tolerance=1e-3, seed=0
    )
    return float(result.eigenvalue)


def run_cell_seed(
    out: str, cell: grid_lib.Cell, seed: int, overrides: dict, log=print, same_updates: bool = False
) -> dict:
    """Trains (or resumes, or skips) one run and returns its result row."""
    import keras

    config = grid_lib.cell_config(cell, seed, overrides, same_updates)
    workdir = grid_lib.run_dir(out, cell, seed)
    run = RunDir(workdir)
    summary = run.read_summary()
    if summary is None or summary.get("status") != "done":
        keras.utils.clear_session()
        summary = train_lib.train(config, workdir, log=log)
    if summary["status"] == "done" and "sharpness" not in summary:
        keras.utils.clear_session()
        summary["sharpness"] = measure_sharpness(workdir, config)
        run.write_summary(summary)
    return reports.run_row(cell, seed, summary, workdir, config)


def run_grid(
    *,
    out: str,
    flagfiles,
    batch_sizes,
    alphas=(),
    seeds,
    noises=(),
    overrides: dict | None = None,
    shard: tuple[int, int] = (0, 1),
    same_updates: bool = False,
    reference: str | None = None,
    noise_temperature_at: str | None = None,
    log=print,
) -> list[dict]:
    """Runs every (cell, seed) of the grid not yet done, then writes tables and figures.

    Args:
        out: output directory.
        flagfiles: base flagfiles (one per dataset/model recipe).
        batch_sizes: global batch sizes; the learning rate follows each
            flagfile's scaling rule.
        alphas: white-noise alphas (0 = no noise).
        seeds: seeds, e.g. range(5).
        noises: more cells' noise and method: `Noise` values, (`Noise`, `Method`) pairs
            or `--noises` entries (`none`, `white:ALPHA`, `matched:b`,
            `multiplicative:b`, `sam:RHO`, `white:1e-5+sam:0.05`, ...).
        overrides: extra `{flag: string}` applied to every run (e.g. epochs).
        shard: (index, count): this process runs every count-th job from index,
            so several processes can share a grid; each writes the tables from
            the runs finished so far.
        same_updates: every batch size makes as many updates as the flagfile's
            base_batch_size (epochs, warm-up and decay stretched by
            B / base_batch_size; `grid.same_updates_changes`).
        reference: a cell name (e.g. "study_mnist1d-b32-none") whose runs every
            cell is compared with in OUT/differences.md (`reports.write_reports`).
        noise_temperature_at: a cell name: OUT/noise_temperature.md measures
            every cell's noise temperature against its small batch's at that
            cell's initial and final weights (`temperatures.noise_temperature_rows`).
        log: progress printer.

    Returns:
        The rows of this grid's runs (OUT/results.csv has every finished run in OUT).
    """
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard!r}.")
    cells = grid_lib.grid_cells(flagfiles, batch_sizes, alphas, noises)
    if not cells:
        raise ValueError("The grid has no cells: give at least one alpha or noise.")
    jobs = [(c, s) for c in cells for s in seeds]
    for cell in cells:  # every combination is checked before anything is written
        grid_lib.cell_config(cell, next(iter(seeds), 0), overrides or {}, same_updates)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    for number, (cell, seed) in enumerate(jobs):
        if number % count != index:
            continue
        row = run_cell_seed(out, cell, seed, overrides or {}, log=log, same_updates=same_updates)
        log(
            f"[{number + 1}/{len(jobs)} {time.time() - start:.0f}s] {cell.name} seed {seed}: "
            f"{row['status']} val {row['val_accuracy']:.4f} gap {row['gap']:+.4f} "
            f"sharpness {row['sharpness']:.3g}"
        )
    order = {grid_lib.run_dir(out, cell, seed): number for number, (cell, seed) in enumerate(jobs)}
    every = reports.write_reports(out, reference, noise_temperature_at)
    return sorted((r for r in every if r["workdir"] in order), key=lambda r: order[r["workdir"]])


def define_flags() -> None:
    if "flagfiles" in flags.FLAGS:
        return
    flags.DEFINE_string("out", "results/offline", "Output directory of the grid.")
    flags.DEFINE_list(
        "flagfiles",
        list(grid_lib.DEFAULT_FLAGFILES),
        "Base flagfiles, one per recipe: paths, or names of the recipes shipped with the "
        f"package ({', '.join(flagfile_lib.recipes())}).",
    )
    flags.DEFINE_list("batch_sizes", ["32", "128", "512", "1024"], "Global batch sizes.")
    flags.DEFINE_list("alphas", ["0", "1e-5", "1e-4", "1e-3"], "Noise alphas (0 = none).")
    flags.DEFINE_list(
        "noises",
        [],
        "Noise kinds instead of --alphas: none, white:ALPHA, matched:b, multiplicative:b "
        "(b = the small batch to emulate; matched and multiplicative need --lr_scaling none or "
        "sqrt in the flagfile or --set); the compared methods sam:RHO, asam:RHO, gnp:LAMBDA "
        "(gradient-norm penalty) and ema:M (weight averaging), alone (no noise) or joined to a "
        "noise with + (white:1e-5+sam:0.05).",
    )
    flags.DEFINE_integer(
        "default_noise_batch_size",
        0,
        "b for the --noises entries given as a bare matched or multiplicative.",
    )
    flags.DEFINE_integer("seeds", 5, "Seeds per cell: 0..seeds-1.")
    flags.DEFINE_multi_string("set", [], "Override for every run, e.g. --set=epochs=5.")
    flags.DEFINE_string("shard", "0/1", "i/n: run every n-th job starting at i.")
    flags.DEFINE_string(
        "reference",
        None,
        "A cell name (e.g. study_mnist1d-b32-none): OUT/differences.md compares every cell "
        "with it (difference of means, Welch's 95% CI).",
    )
    flags.DEFINE_string(
        "noise_temperature_at",
        None,
        "A cell name: OUT/noise_temperature.md gives every cell's noise temperature against "
        "its small batch's, measured at that cell's initial and final weights.",
    )
    flags.DEFINE_bool(
        "same_updates",
        False,
        "Every batch size makes as many updates as the flagfile's --base_batch_size: epochs, "
        "warm-up and decay epochs stretched by B / base_batch_size (Hoffer et al. 2017).",
    )


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like 'i/n' (e.g. 0/2); received {text!r}.") from None
    return index, count


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    train_lib.quiet_info_logs(FLAGS)
    with _cli.sigint_at_batch_boundaries():
        return _run_from_flags(FLAGS)


def _run_from_flags(FLAGS) -> int:
    try:
        overrides = {}
        for item in FLAGS.set:
            if "=" not in item:
                raise ValueError(f"--set expects name=value; received {item!r}.")
            key, value = item.split("=", 1)
            overrides[key.lstrip("-")] = value
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
        alphas = [float(a) for a in FLAGS.alphas]
        noises = [grid_lib.parse_kind(n, FLAGS.default_noise_batch_size) for n in FLAGS.noises]
        if noises:
            if FLAGS["alphas"].present:
                raise ValueError("Give --alphas or --noises, not both (white:ALPHA is a noise).")
            alphas = []
        if FLAGS.seeds < 1:
            raise ValueError(f"--seeds must be >= 1; received {FLAGS.seeds}.")
        for name in FLAGS.flagfiles:
            config_lib.read_flagfile(flagfile_lib.resolve(name))
        for module in ("scipy", "matplotlib"):  # the tables and figures, checked before any run
            _extras.require(module, "noisy_keras.experiments", extra="study")
        _cli.quiet_tensorflow()
        rows = run_grid(
            out=FLAGS.out,
            flagfiles=FLAGS.flagfiles,
            batch_sizes=batch_sizes,
            alphas=alphas,
            noises=noises,
            seeds=list(range(FLAGS.seeds)),
            overrides=overrides,
            shard=_parse_shard(FLAGS.shard),
            same_updates=FLAGS.same_updates,
            reference=FLAGS.reference,
            noise_temperature_at=FLAGS.noise_temperature_at,
        )
    except (ValueError, FileNotFoundError, ConnectionError, _extras.MissingExtraError) as error:
        print(f"noisy_keras.experiments: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "noisy_keras.experiments: interrupted; rerun the same command to continue "
            "(finished runs are kept, the current one resumes from its checkpoint)",
            file=sys.stderr,
        )
        return _cli.EXIT_INTERRUPTED
    print(f"noisy_keras.experiments: {len(rows)} runs reported in {FLAGS.out}/table.md")
    return 0


def run() -> None:
    """Console-script entry point (`noisy-keras-experiments`)."""
    define_flags()
    _cli.run_app(main, "noisy_keras.experiments")


if __name__ == "__main__":
    run()
