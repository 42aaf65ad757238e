"""A grid's cells: base flagfile x batch size x kind, and each run's config and directory.

A cell is (flagfile, batch size, noise, method). A flagfile is a path, or the bare name
of a recipe shipped with the package (`noisy_keras.run.flagfile.recipes()`, the
files of the repository's flags/), which resolves from any working directory. The noise of
a cell is a noise kind of the main job (`--noise`): `none`, `white:ALPHA`,
`matched:b`, `multiplicative:b` (b the small batch whose noise the kind
restores). Its method is a compared method of the main job, none by default:
`sam:RHO`, `asam:RHO` (adaptive), `gnp:LAMBDA` (the gradient-norm penalty),
each optionally with `ema:M` (weight averaging); a `--noises` entry joins them
with `+` (`white:1e-5+sam:0.05`; a method alone trains without noise).
Run directories are `OUT/runs/<cell>/seed<k>`, with cells named
`<flagfile>-b<B>-a<alpha>` for white noise and `-none`, `-matched-n<b>`,
`-multiplicative-n<b>` for the others (`Cell.name`), followed by the method's
`TrainConfig.method_name` (`-sam0.05`, `-ema0.99`, ...); `cell_of_run` reads a
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


@dataclasses.dataclass(frozen=True)
class Method:
    """A cell's compared method: a `--method` with its setting, and weight averaging.

    Attributes:
        kind: "none", "sam" or "gradient_norm_penalty".
        value: SAM's rho or the penalty's lambda (0 for none).
        adaptive: adaptive SAM.
        ema: the weights' moving-average momentum (0: none).
    """

    kind: str = "none"
    value: float = 0.0
    adaptive: bool = False
    ema: float = 0.0

    @classmethod
    def of_config(cls, config: config_lib.TrainConfig) -> Method:
        """The method a config trains with (the inverse of `config_changes`)."""
        value = {"none": 0.0, "sam": config.sam_rho}.get(config.method, config.penalty_strength)
        return cls(config.method, value, config.sam_adaptive, config.ema_momentum)

    def config_changes(self) -> dict:
        """The `TrainConfig` fields this method sets (the others keep their defaults)."""
        changes = {"method": self.kind, "ema_momentum": self.ema}
        if self.kind == "sam":
            changes.update(sam_rho=self.value, sam_adaptive=self.adaptive)
        elif self.kind == "gradient_norm_penalty":
            changes.update(penalty_strength=self.value)
        return changes

    @property
    def name(self) -> str:
        """'' for none, else as in run names (`TrainConfig.method_name`): `-sam0.05`, ..."""
        return config_lib.TrainConfig(**self.config_changes()).method_name()

    @property
    def label(self) -> str:
        """The method in tables and legends ('' for none): ` + SAM rho=0.05`, ` + EMA 0.99`."""
        text = {
            "none": "",
            "sam": f" + {'adaptive ' if self.adaptive else ''}SAM rho={self.value:g}",
            "gradient_norm_penalty": f" + grad-norm penalty lambda={self.value:g}",
        }[self.kind]
        return text + (f" + EMA {self.ema:g}" if self.ema else "")


# `--noises` entry parts naming a method: kind -> (TrainConfig.method, adaptive).
_METHOD_PARTS = {
    "sam": ("sam", False),
    "asam": ("sam", True),
    "gnp": ("gradient_norm_penalty", False),
}


def parse_kind(text: str, default_batch_size: int = 0) -> tuple[Noise, Method]:
    """One `--noises` entry: a noise, a method, or both joined by `+` (module doc).

    `sam:0.05`, `asam:0.5`, `gnp:0.01` and `ema:0.99` are methods; at most one
    noise, one of sam/asam/gnp and one ema per entry. Without a noise part the
    noise is none.

    Raises:
        ValueError: naming the entry and what is allowed.
    """
    allowed = (
        "a noise (none, white:ALPHA, matched[:b], multiplicative[:b]) and/or methods "
        "(sam:RHO, asam:RHO, gnp:LAMBDA, ema:M) joined by +"
    )
    noise, method, ema = None, None, 0.0
    for part in text.strip().split("+"):
        kind, _, value = part.strip().partition(":")
        if kind in _METHOD_PARTS or kind == "ema":
            number = float(value) if _is_number(value, float) else None
            ok = number is not None and (0 < number < 1 if kind == "ema" else 0 < number)
            if not ok or (kind == "ema" and ema) or (kind != "ema" and method):
                raise ValueError(
                    f"--noises entry {text!r}: part {part!r} must be {kind}:"
                    f"{'M with 0 < M < 1' if kind == 'ema' else 'X with X > 0'}, once per "
                    f"entry; allowed: {allowed}."
                )
            if kind == "ema":
                ema = number
            else:
                method = (*_METHOD_PARTS[kind], number)
        elif noise is None:
            noise = parse_noise(part, default_batch_size)
        else:
            raise ValueError(f"--noises entry {text!r} has two noises; allowed: {allowed}.")
    if noise is None:
        noise = Noise("none")
    if method is None:
        return noise, Method(ema=ema)
    kind, adaptive, value = method
    return noise, Method(kind, value, adaptive, ema)


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
    """One configuration of a grid: a base flagfile with batch size, noise and method overridden."""

    flagfile: str
    batch_size: int
    alpha: float
    noise: Noise | None = None  # None: white noise of `alpha` (the original grid)
    method: Method = Method()

    @classmethod
    def of(cls, flagfile: str, batch_size: int, noise: Noise, method: Method = Method()) -> Cell:
        """The cell of `flagfile` at `batch_size` with `noise` (white noise kept as `alpha`)."""
        plain = None if noise.kind == "white" else noise
        return cls(flagfile, batch_size, noise.alpha, plain, method)

    @property
    def kind(self) -> Noise:
        return self.noise if self.noise is not None else Noise("white", alpha=self.alpha)

    @property
    def base_name(self) -> str:
        return os.path.splitext(os.path.basename(self.flagfile))[0]

    @property
    def name(self) -> str:
        return f"{self.base_name}-b{self.batch_size}-{self.kind.name}{self.method.name}"

    @property
    def label(self) -> str:
        """The table's noise column: the noise's label, then the method's."""
        return self.kind.label + self.method.label

    @property
    def legend(self) -> str:
        """The figures' name of the cell's noise and method."""
        return self.kind.legend + self.method.label


DEFAULT_FLAGFILES = ("repro_digits.flags", "repro_mnist1d.flags")


def grid_cells(flagfiles, batch_sizes, alphas=(), noises=()) -> list[Cell]:
    """The grid's cells in a fixed order: flagfile, then batch size, then noise.

    Args:
        flagfiles, batch_sizes: as in `run_grid`.
        alphas: white-noise alphas (the original grid).
        noises: `Noise` values, (`Noise`, `Method`) pairs or `--noises` entries, after
            the alphas.
    """
    kinds = [(Noise("white", alpha=float(a)), Method()) for a in alphas]
    for entry in noises:
        if isinstance(entry, Noise):
            kinds.append((entry, Method()))
        elif isinstance(entry, tuple):
            kinds.append(entry)
        else:
            kinds.append(parse_kind(entry))
    return [
        Cell.of(flagfile_lib.resolve(f), int(b), noise, method)
        for f, b, (noise, method) in itertools.product(flagfiles, batch_sizes, kinds)
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
            batch_size=cell.batch_size,
            seed=seed,
            **cell.kind.config_changes(),
            **cell.method.config_changes(),
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
    noise, method = Noise.of_config(config), Method.of_config(config)
    name = os.path.basename(os.path.dirname(os.path.normpath(workdir)))
    suffix = f"-b{config.batch_size}-{noise.name}{method.name}"
    if not name.endswith(suffix) or len(name) == len(suffix):
        raise ValueError(
            f"run directory {workdir!r}: cell name {name!r} does not end with {suffix!r}, the "
            "batch size, noise and method of its flags.txt."
        )
    return Cell.of(f"{name[: -len(suffix)]}.flags", config.batch_size, noise, method)
