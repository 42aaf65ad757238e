"""A grid's cells: base flagfile x batch size x noise, and each run's config and directory.

A cell is (flagfile, batch size, noise). A flagfile is a path, or the bare name
of a recipe shipped with the package (`noisy_keras.run.flagfile.recipes()`, the
files of the repository's flags/), which resolves from any working directory. The noise of
a cell is a noise kind of the main job (`--noise`): `none`, `white:ALPHA`,
`matched:b`, `multiplicative:b` (b the small batch whose noise the kind
restores). Run directories are `OUT/runs/<cell>/seed<k>`, with cells named
`<flagfile>-b<B>-a<alpha>` for white noise and `-none`, `-matched-n<b>`,
`-multiplicative-n<b>` for the others (`Cell.name`); `cell_of_run` reads a
cell back from a run's flags.txt.

The runner (`noisy_keras.experiments`) trains the runs; `noisy_keras.study.reports`
turns them into tables and figures.
"""

from __future__ import annotations

import dataclasses
import fractions
import itertools
import os

from noisy_keras.run import config as config_lib
from noisy_keras.run import flagfile as flagfile_lib


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

    @classmethod
    def of_config(cls, config: config_lib.TrainConfig) -> Noise:
        """The noise a config trains with (the inverse of `config_changes`)."""
        if config.noise == "white":
            return cls("white", alpha=config.noise_alpha)
        if config.noise == "none":
            return cls("none")
        return cls(config.noise, batch_size=config.noise_batch_size)

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

    @classmethod
    def of(cls, flagfile: str, batch_size: int, noise: Noise) -> Cell:
        """The cell of `flagfile` at `batch_size` with `noise` (white noise kept as `alpha`)."""
        return cls(flagfile, batch_size, noise.alpha, None if noise.kind == "white" else noise)

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
        Cell.of(flagfile_lib.resolve(f), int(b), k)
        for f, b, k in itertools.product(flagfiles, batch_sizes, kinds)
    ]


def run_dir(out: str, cell: Cell, seed: int) -> str:
    return os.path.join(out, "runs", cell.name, f"seed{seed}")


def same_updates_changes(config: config_lib.TrainConfig) -> dict:
    """Epoch fields stretched by B / base_batch_size, so B makes about as many updates as the base.

    Hoffer et al.'s (2017) "regime adaptation": a batch k times larger trains k
    times as many epochs, with warm-up and decay epochs stretched alike. The update
    counts are equal when both batch sizes divide the N training examples; otherwise
    each epoch drops its partial batch, and B makes k E floor(N / B) updates against
    E floor(N / b) (on 4,000 examples: 6,720 at B=512, 7,500 at b=32).

    Raises:
        ValueError: a stretched field would not be a whole number of epochs.
    """
    factor = fractions.Fraction(config.batch_size, config.base_batch_size)

    def stretched(name: str, epochs: int) -> int:
        value = epochs * factor
        if value.denominator != 1:
            raise ValueError(
                f"same_updates: {name}={getattr(config, name)} x batch_size / base_batch_size "
                f"({config.batch_size}/{config.base_batch_size}) is not a whole number of epochs."
            )
        return int(value)

    return {
        "epochs": stretched("epochs", config.epochs),
        "lr_decay_every": stretched("lr_decay_every", config.lr_decay_every),
        "lr_decay_epochs": tuple(stretched("lr_decay_epochs", e) for e in config.lr_decay_epochs),
        "warmup_epochs": config.warmup_epochs * float(factor),
    }


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


def cell_of_run(workdir: str, config: config_lib.TrainConfig) -> Cell:
    """The cell of a run directory `OUT/runs/<cell>/seed<k>`, from its config (flags.txt).

    The base flagfile's name is the cell name less the batch and noise suffix
    that `Cell.name` appends.

    Raises:
        ValueError: the directory name does not end as the config's cell would.
    """
    noise = Noise.of_config(config)
    name = os.path.basename(os.path.dirname(os.path.normpath(workdir)))
    suffix = f"-b{config.batch_size}-{noise.name}"
    if not name.endswith(suffix) or len(name) == len(suffix):
        raise ValueError(
            f"run directory {workdir!r}: cell name {name!r} does not end with {suffix!r}, the "
            "batch size and noise of its flags.txt."
        )
    return Cell.of(f"{name[: -len(suffix)]}.flags", config.batch_size, noise)
