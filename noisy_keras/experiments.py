r"""Grids of configurations x seeds through the main job, with tables and figures.

    python -m noisy_keras.experiments --out=results/offline       # the packaged recipes
    python -m noisy_keras.experiments --out=results/offline \
        --flagfiles=repro_digits.flags,my_recipe.flags \
        --batch_sizes=32,64,128,256,512,1024 --alphas=0,1e-5,1e-3,1e-2 --seeds=5

    python -m noisy_keras.experiments --out=results/kinds --flagfiles=flags/repro_digits.flags \
        --set=lr_scaling=none --batch_sizes=512 --seeds=5 \
        --noises=none,white:1e-5,matched:32,multiplicative:32

Each cell is (flagfile, batch size, noise); each cell runs once per seed with
`noisy_keras.train.train`, in `OUT/runs/<cell>/seed<k>`. A flagfile is a path,
or the bare name of a recipe shipped with the package (`packaged_flagfiles()`,
the files of the repository's flags/), which resolves from any working
directory. A run whose `summary.json` says "done" is never redone, so an
interrupted grid resumes where it stopped when the same command is run again
(a run stopped half-way resumes from its last checkpoint). After training, the
sharpness of each run (top Hessian eigenvalue of the training loss on a fixed
subset of training examples, Jastrzebski et al. 2018) is measured once and
stored next to it.

The noise of a cell is a noise kind of the main job (`--noise`): `--alphas`
gives white-noise cells (alpha 0 meaning no noise; the original grid), and
`--noises` any kinds: `none`, `white:ALPHA`, `matched:b`, `multiplicative:b`
(b the small batch whose noise the kind restores; a bare `matched` takes
`--default_noise_batch_size`). Run directories, tables and figures name the noise:
`<flagfile>-b<B>-a<alpha>` for white noise, as before, and `-none`,
`-matched-n<b>`, `-multiplicative-n<b>` for the others.

Outputs in OUT:
    results.csv      one row per run
    table.csv/.md    per cell: n, mean, sd and 95% CI (Student t) of final validation
                     accuracy, training accuracy, gap, sharpness and wall time
                     (accuracies in %, the gap in percentage points in table.md)
    gap_<config>.png, val_<config>.png     gap / validation accuracy vs batch size (same units)
    noise_<config>_b<B>.png                validation curves with and without noise
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import itertools
import math
import os
import sys
import time

from absl import app, flags

from noisy_keras import _cli
from noisy_keras import config as config_lib
from noisy_keras import train as train_lib
from noisy_keras import workdir as workdir_lib

SHARPNESS_EXAMPLES = 512
METRICS = ("val_accuracy", "train_accuracy", "gap", "sharpness", "wall_time_s")


@dataclasses.dataclass(frozen=True)
class Noise:
    """A cell's noise: a `--noise` kind with its alpha (white) or small batch b (others)."""

    kind: str = "white"
    alpha: float = 0.0
    batch_size: int = 0

    @property
    def name(self) -> str:
        """`a<alpha>`, `none`, `matched-n<b>`, `multiplicative-n<b>` (as in run names)."""
        if self.kind == "white":
            return f"a{self.alpha:g}"
        return "none" if self.kind == "none" else f"{self.kind}-n{self.batch_size}"

    @property
    def label(self) -> str:
        """The table's noise column: the alpha for white noise (as before), else the kind."""
        if self.kind == "white":
            return f"{self.alpha:g}"
        return "none" if self.kind == "none" else f"{self.kind} b={self.batch_size}"

    @property
    def legend(self) -> str:
        """The figures' name of the noise."""
        if self.kind == "white":
            return "no noise" if self.alpha == 0 else f"alpha={self.alpha:g}"
        return "none" if self.kind == "none" else f"{self.kind} (b={self.batch_size})"

    def config_changes(self) -> dict:
        """The `TrainConfig` fields this noise sets."""
        return {"noise": self.kind, "noise_alpha": self.alpha, "noise_batch_size": self.batch_size}


def parse_noise(text: str, default_batch_size: int = 0) -> Noise:
    """One `--noises` entry: `none`, `white:ALPHA`, `matched[:b]` or `multiplicative[:b]`.

    A bare `matched` or `multiplicative` takes b = `default_batch_size`.

    Raises:
        ValueError: naming the entry and what is allowed.
    """
    kind, _, value = text.strip().partition(":")
    if kind == "none" and not value:
        return Noise("none")
    if kind == "white" and _is_number(value, float):
        return Noise("white", alpha=float(value))
    if kind in ("matched", "multiplicative") and (not value or _is_number(value, int)):
        batch_size = int(value) if value else default_batch_size
        if batch_size < 1:
            raise ValueError(
                f"--noises entry {text!r} needs a small batch b >= 1: write {kind}:b (e.g. "
                f"{kind}:32) or pass --default_noise_batch_size=b."
            )
        return Noise(kind, batch_size=batch_size)
    raise ValueError(
        f"--noises entry {text!r} is not one of none, white:ALPHA, matched[:b], multiplicative[:b]."
    )


def _is_number(text: str, kind) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of a grid: a base flagfile with batch size and noise overridden."""

    flagfile: str
    batch_size: int
    alpha: float
    noise: Noise | None = None  # None: white noise of `alpha` (the original grid)

    @property
    def kind(self) -> Noise:
        return self.noise if self.noise is not None else Noise("white", alpha=self.alpha)

    @property
    def base_name(self) -> str:
        return os.path.splitext(os.path.basename(self.flagfile))[0]

    @property
    def name(self) -> str:
        return f"{self.base_name}-b{self.batch_size}-{self.kind.name}"


DEFAULT_FLAGFILES = ("repro_digits.flags", "repro_mnist1d.flags")


def packaged_flagfiles() -> dict[str, str]:
    """The recipes shipped with the package: {file name: path}.

    From a source checkout (`flags/` next to the package) the repository's
    files; from an installed package, the copies installed as
    `noisy_keras.flagfiles`.
    """
    checkout = os.path.join(os.path.dirname(os.path.dirname(__file__)), "flags")
    if os.path.isfile(os.path.join(checkout, "__init__.py")):
        directory = checkout
    else:
        directory = str(importlib.resources.files("noisy_keras.flagfiles"))
    return {
        name: os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.endswith(".flags")
    }


def resolve_flagfile(name_or_path: str) -> str:
    """A flagfile path: `name_or_path` itself if it is a file, else the packaged recipe.

    Args:
        name_or_path: a path, or the bare name of a packaged recipe
            (e.g. "repro_digits.flags"; the ".flags" may be left out).

    Raises:
        FileNotFoundError: neither a file nor a packaged recipe, naming the recipes.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    recipes = packaged_flagfiles()
    if os.path.basename(name_or_path) == name_or_path:
        for candidate in (name_or_path, f"{name_or_path}.flags"):
            if candidate in recipes:
                return recipes[candidate]
    raise FileNotFoundError(
        f"flagfile {name_or_path!r} is neither a file nor a recipe shipped with the package; "
        f"recipes: {', '.join(recipes)}."
    )


def grid_cells(flagfiles, batch_sizes, alphas=(), noises=()) -> list[Cell]:
    """The grid's cells in a fixed order: flagfile, then batch size, then noise.

    Args:
        flagfiles, batch_sizes: as in `run_grid`.
        alphas: white-noise alphas (the original grid).
        noises: `Noise` values (or `--noises` entries), after the alphas.
    """
    kinds = [Noise("white", alpha=float(a)) for a in alphas]
    kinds += [n if isinstance(n, Noise) else parse_noise(n) for n in noises]
    return [
        Cell(resolve_flagfile(f), int(b), k.alpha, None if k.kind == "white" else k)
        for f, b, k in itertools.product(flagfiles, batch_sizes, kinds)
    ]


def run_dir(out: str, cell: Cell, seed: int) -> str:
    return os.path.join(out, "runs", cell.name, f"seed{seed}")


def measure_sharpness(workdir: str, config: config_lib.TrainConfig) -> float:
    """Top Hessian eigenvalue of the training loss of a finished run (Lanczos).

    Uses the first `SHARPNESS_EXAMPLES` training examples of the run's split,
    normalized as in training, and the saved final model.
    """
    import keras

    from noisy_keras import recipe
    from noisy_keras.analysis import hessian

    dataset = recipe.load_data(config)
    x, y = dataset.train_sample(min(SHARPNESS_EXAMPLES, dataset.num_train))
    model = keras.models.load_model(os.path.join(workdir, workdir_lib.MODEL_FILE), compile=False)
    result = hessian.hessian_eigenvalues(
        model, (x, y), k=1, max_iterations=60, tolerance=1e-3, seed=0
    )
    return float(result.eigenvalue)


def same_updates_changes(config: config_lib.TrainConfig) -> dict:
    """Epoch fields stretched by B / base_batch_size, so B makes as many updates as the base.

    Hoffer et al.'s (2017) "regime adaptation": a batch k times larger trains k
    times as many epochs, with warm-up and decay epochs stretched alike, so the
    learning-rate schedule sees the same update indices as at the base batch.

    Raises:
        ValueError: a stretched field would not be a whole number of epochs.
    """
    factor = config.batch_size / config.base_batch_size
    changes = {
        "epochs": config.epochs * factor,
        "lr_decay_every": config.lr_decay_every * factor,
        "lr_decay_epochs": tuple(e * factor for e in config.lr_decay_epochs),
    }
    for name, value in changes.items():
        values = value if isinstance(value, tuple) else (value,)
        if any(v != round(v) for v in values):
            raise ValueError(
                f"same_updates: {name}={getattr(config, name)} x batch_size / base_batch_size "
                f"({config.batch_size}/{config.base_batch_size}) is not a whole number of epochs."
            )
    changes = {
        k: tuple(int(round(x)) for x in v) if isinstance(v, tuple) else int(round(v))
        for k, v in changes.items()
    }
    return {**changes, "warmup_epochs": config.warmup_epochs * factor}


def cell_config(
    cell: Cell, seed: int, overrides: dict, same_updates: bool = False
) -> config_lib.TrainConfig:
    """The validated config of one run: the flagfile, `overrides`, then the cell's values.

    With `same_updates`, the epoch fields follow `same_updates_changes`.

    Raises:
        ValueError: the combination is not allowed, with the cell named.
    """
    values = {"verbose": "0", **config_lib.read_flagfile(cell.flagfile), **overrides}
    try:
        config = config_lib.config_from_strings(values).replace(
            batch_size=cell.batch_size, seed=seed, **cell.kind.config_changes()
        )
        return config.replace(**same_updates_changes(config)) if same_updates else config
    except ValueError as error:
        raise ValueError(f"cell {cell.name}: {error}") from None


def _row(cell: Cell, seed: int, summary: dict, workdir: str) -> dict:
    return {
        "cell": cell.name,
        "base": cell.base_name,
        "batch_size": cell.batch_size,
        "noise": cell.kind.kind,
        "alpha": cell.alpha,
        "noise_batch_size": cell.kind.batch_size,
        "noise_label": cell.kind.label,
        "legend": cell.kind.legend,
        "seed": seed,
        "status": summary["status"],
        **{m: float(summary.get(m, float("nan"))) for m in METRICS},
        "workdir": workdir,
    }


def run_cell_seed(
    out: str, cell: Cell, seed: int, overrides: dict, log=print, same_updates: bool = False
) -> dict:
    """Trains (or resumes, or skips) one run and returns its result row."""
    import keras

    config = cell_config(cell, seed, overrides, same_updates)
    workdir = run_dir(out, cell, seed)
    summary_path = os.path.join(workdir, workdir_lib.SUMMARY_FILE)
    summary = workdir_lib.read_json(summary_path)
    if summary is None or summary.get("status") != "done":
        keras.utils.clear_session()
        summary = train_lib.train(config, workdir, log=log)
    if summary["status"] == "done" and "sharpness" not in summary:
        keras.utils.clear_session()
        summary["sharpness"] = measure_sharpness(workdir, config)
        workdir_lib.write_json(summary_path, summary)
    return {
        **_row(cell, seed, summary, workdir),
        "dataset": config.dataset,
        "model": config.model,
    }


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Per cell: n and mean, sd, 95% CI of every metric over the finished seeds."""
    from noisy_keras.analysis import stats

    table = []
    cells = {}
    for row in rows:
        key = (row["base"], row["batch_size"], row.get("noise_label", f"{row['alpha']:g}"))
        cells.setdefault(key, []).append(row)
    for (base, batch_size, label), members in cells.items():
        done = [r for r in members if r["status"] == "done"]
        entry = {
            "base": base,
            "batch_size": batch_size,
            "noise": members[0].get("noise", "white"),
            "alpha": members[0]["alpha"],
            "noise_batch_size": members[0].get("noise_batch_size", 0),
            "noise_label": label,
            "n": len(done),
        }
        entry["diverged"] = sum(r["status"] == "diverged" for r in members)
        for metric in METRICS:
            values = [r[metric] for r in done if math.isfinite(r[metric])]
            if values:
                s = stats.summarize(values)
                entry.update(
                    {
                        f"{metric}_mean": s.mean,
                        f"{metric}_sd": s.std,
                        f"{metric}_ci_low": s.ci_low,
                        f"{metric}_ci_high": s.ci_high,
                    }
                )
        table.append(entry)
    return table


def _fmt(entry: dict, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "-"
    low, high = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
    if math.isnan(low):
        return f"{scale * mean:.{digits}f}"
    half = scale * (high - low) / 2
    return f"{scale * mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(table: list[dict]) -> str:
    """The per-cell table in Markdown: mean ± 95% CI half-width (accuracies in %)."""
    lines = [
        "| config | B | noise | n | val acc % | train acc % | gap (pp) | sharpness | time s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        lines.append(
            f"| {e['base']} | {e['batch_size']} | {e['noise_label']} | {e['n']} | "
            f"{_fmt(e, 'val_accuracy')} | {_fmt(e, 'train_accuracy')} | {_fmt(e, 'gap')} | "
            f"{_fmt(e, 'sharpness', 1.0, 2)} | {_fmt(e, 'wall_time_s', 1.0, 0)} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict]) -> None:
    keys = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _what(rows: list[dict]) -> str:
    """Dataset and model of a config's runs, for figure titles."""
    names = sorted({f"{r.get('dataset', '?')}, {r.get('model', '?')}" for r in rows})
    return "; ".join(names)


def write_figures(out: str, rows: list[dict]) -> list[str]:
    """Gap and validation accuracy vs batch size per base config; noise comparison curves.

    Accuracies in percent and the gap in percentage points, as in table.md;
    titles name the config, dataset and model (and the batch size of the
    noise comparison); alpha is in each legend.
    """
    from noisy_keras.analysis import plots

    written = []
    for base in sorted({r["base"] for r in rows}):
        done = [r for r in rows if r["base"] == base and r["status"] == "done"]
        if not done:
            continue
        what = _what(done)
        for metric, prefix, label in (
            ("gap", "gap", "final gap: training - validation accuracy (percentage points)"),
            ("val_accuracy", "val", "final validation accuracy (%)"),
        ):
            groups = {}
            for r in done:
                name = r["legend"]
                groups.setdefault(name, {}).setdefault(r["batch_size"], []).append(
                    100.0 * r[metric]
                )
            path = os.path.join(out, f"{prefix}_{base}.png")
            plots.plot_gap_vs_batch_size(
                groups, path, ylabel=label, title=f"{base}: {what}, mean over seeds, 95% CI"
            )
            written.append(path)
        largest = max(r["batch_size"] for r in done)
        curves = {}
        for r in done:
            if r["batch_size"] == largest:
                name = r["legend"]
                curves.setdefault(name, []).append(
                    workdir_lib.read_metrics(os.path.join(r["workdir"], workdir_lib.METRICS_FILE))
                )
        path = os.path.join(out, f"noise_{base}_b{largest}.png")
        plots.plot_noise_comparison(
            curves, path, title=f"{base}: {what}, B={largest}, mean over seeds, 95% CI"
        )
        written.append(path)
    import matplotlib.pyplot as plt

    plt.close("all")
    return written


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
        noises: more cells' noise: `Noise` values or `--noises` entries
            (`none`, `white:ALPHA`, `matched:b`, `multiplicative:b`).
        overrides: extra `{flag: string}` applied to every run (e.g. epochs).
        shard: (index, count): this process runs every count-th job from index,
            so several processes can share a grid; each writes the tables from
            the runs finished so far.
        same_updates: every batch size makes as many updates as the flagfile's
            base_batch_size (epochs, warm-up and decay stretched by
            B / base_batch_size; `same_updates_changes`).
        log: progress printer.

    Returns:
        The per-run rows (also in OUT/results.csv).
    """
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard!r}.")
    cells = grid_cells(flagfiles, batch_sizes, alphas, noises)
    if not cells:
        raise ValueError("The grid has no cells: give at least one alpha or noise.")
    jobs = [(c, s) for c in cells for s in seeds]
    for cell in cells:  # every combination is checked before anything is written
        cell_config(cell, next(iter(seeds), 0), overrides or {}, same_updates)
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
    return write_reports(out, jobs)


def write_reports(out: str, jobs) -> list[dict]:
    """Collects every finished run of `jobs` into results.csv, table.csv/.md and figures."""
    rows = []
    for cell, seed in jobs:
        summary = workdir_lib.read_json(
            os.path.join(run_dir(out, cell, seed), workdir_lib.SUMMARY_FILE)
        )
        if summary is None:
            continue
        flagfile = os.path.join(run_dir(out, cell, seed), workdir_lib.FLAGS_FILE)
        run_flags = config_lib.read_flagfile(flagfile) if os.path.exists(flagfile) else {}
        rows.append(
            {
                **_row(cell, seed, summary, run_dir(out, cell, seed)),
                "dataset": run_flags.get("dataset", "?"),
                "model": run_flags.get("model", "?"),
            }
        )
    if not rows:
        return rows
    _write_csv(
        os.path.join(out, "results.csv"),
        [{k: v for k, v in r.items() if k != "workdir"} for r in rows],
    )
    table = summarize_rows(rows)
    _write_csv(os.path.join(out, "table.csv"), table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(table))
    write_figures(out, rows)
    return rows


def define_flags() -> None:
    if "flagfiles" in flags.FLAGS:
        return
    flags.DEFINE_string("out", "results/offline", "Output directory of the grid.")
    flags.DEFINE_list(
        "flagfiles",
        list(DEFAULT_FLAGFILES),
        "Base flagfiles, one per recipe: paths, or names of the recipes shipped with the "
        f"package ({', '.join(packaged_flagfiles())}).",
    )
    flags.DEFINE_list("batch_sizes", ["32", "128", "512", "1024"], "Global batch sizes.")
    flags.DEFINE_list("alphas", ["0", "1e-5", "1e-4", "1e-3"], "Noise alphas (0 = none).")
    flags.DEFINE_list(
        "noises",
        [],
        "Noise kinds instead of --alphas: none, white:ALPHA, matched:b, multiplicative:b "
        "(b = the small batch to emulate; matched and multiplicative need --lr_scaling none or "
        "sqrt in the flagfile or --set).",
    )
    flags.DEFINE_integer(
        "default_noise_batch_size",
        0,
        "b for the --noises entries given as a bare matched or multiplicative.",
    )
    flags.DEFINE_integer("seeds", 5, "Seeds per cell: 0..seeds-1.")
    flags.DEFINE_multi_string("set", [], "Override for every run, e.g. --set=epochs=5.")
    flags.DEFINE_string("shard", "0/1", "i/n: run every n-th job starting at i.")
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
        noises = [parse_noise(n, FLAGS.default_noise_batch_size) for n in FLAGS.noises]
        if noises:
            if FLAGS["alphas"].present:
                raise ValueError("Give --alphas or --noises, not both (white:ALPHA is a noise).")
            alphas = []
        if FLAGS.seeds < 1:
            raise ValueError(f"--seeds must be >= 1; received {FLAGS.seeds}.")
        for name in FLAGS.flagfiles:
            config_lib.read_flagfile(resolve_flagfile(name))
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
        )
    except (ValueError, FileNotFoundError, ConnectionError) as error:
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
    app.run(main)


if __name__ == "__main__":
    run()
