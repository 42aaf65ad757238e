"""Who may create, resume or replace a run directory, decided before anything is written.

The contract, decided by `check_workdir` before anything is created:

* A directory is a run when it holds the marker `RUN_MARKER`, which the package
  writes when it creates the directory. A missing or empty directory becomes a
  new run; any other directory is refused, and nothing in it is touched.
* A run is resumed when its saved flags equal the new ones, except for
  `config.RESUMABLE_FIELDS` (more epochs continue it; data location and
  verbosity do not change what is trained). A run whose summary says "done"
  after the same number of epochs is left exactly as it is.
* `overwrite` replaces a run: it deletes the run's own files (`RUN_FILES`) and
  nothing else. It refuses a directory that is not a run, a run holding other
  files, and `.`, a parent of the current directory, the home directory or `/`,
  whatever they hold.

The files themselves, and their one writer `RunDir`, are `noisy_keras.engine.rundir`.
"""

from __future__ import annotations

import dataclasses
import os

from noisy_keras.engine.rundir import RUN_FILES, RUN_MARKER, RunDir, is_temporary
from noisy_keras.run import config as config_lib

ACTIONS = ("create", "resume", "overwrite", "done")

__all__ = [
    "ACTIONS",
    "WorkdirPlan",
    "check_workdir",
    "make_workdir",
    "prepare_workdir",
    "read_run_config",
]


@dataclasses.dataclass(frozen=True)
class WorkdirPlan:
    """What a run will do with its directory, decided by `check_workdir`.

    Attributes:
        workdir: the directory as given.
        action: "create" (missing or empty), "resume" (a run with the same
            configuration), "overwrite" (a run to replace) or "done" (a run
            with the same configuration that is already finished).
        summary: the finished run's summary for "done", else None.
    """

    workdir: str
    action: str
    summary: dict | None = None


def _protected_reason(workdir: str) -> str | None:
    """Why `--overwrite` may never touch `workdir` whatever it holds, or None."""
    target = os.path.realpath(workdir)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if target == cwd:
        return "it is the current directory"
    if cwd.startswith(target.rstrip(os.sep) + os.sep) or target == os.sep:
        return "it is a parent of the current directory"
    if target == home:
        return "it is the home directory"
    return None


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_workdir(
    workdir: str, config: config_lib.TrainConfig, overwrite: bool = False
) -> WorkdirPlan:
    """Decides what a run with `config` may do with `workdir`, touching nothing.

    Rule (see the module docstring): a missing or empty directory is created; a
    directory with `RUN_MARKER` whose flags equal `config`'s (except
    `config.RESUMABLE_FIELDS`) is resumed, or left as it is when its summary
    says "done" after `config.epochs` epochs; with `overwrite`, a run holding
    only `RUN_FILES` is replaced. Everything else is refused.

    Args:
        workdir: the run directory.
        config: the run's configuration (already validated).
        overwrite: replace the run in `workdir`.

    Returns:
        A `WorkdirPlan`.

    Raises:
        ValueError: the directory is refused; the message says what it holds
            and that nothing was deleted.
    """
    if not isinstance(workdir, str) or not workdir:
        raise ValueError(f"workdir must be a non-empty path; received {workdir!r}.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} is a file, not a directory (nothing was deleted).")
    entries = os.listdir(workdir) if os.path.isdir(workdir) else []
    protected = _protected_reason(workdir) if overwrite else None
    if protected:
        raise ValueError(
            f"--overwrite refuses --workdir={workdir!r}: {protected}"
            + (f" (it holds {_listing(entries)})" if entries else "")
            + ". Give a run directory of its own, e.g. runs/NAME (nothing was deleted)."
        )
    if not entries:
        return WorkdirPlan(workdir, "create")
    if RUN_MARKER not in entries:
        raise ValueError(
            f"--workdir={workdir!r} is not empty and is not a run directory of noisy_keras (no "
            f"{RUN_MARKER} marker); it holds {_listing(entries)}. Choose another --workdir"
            + (
                "; --overwrite deletes only run directories that noisy_keras made"
                if overwrite
                else ""
            )
            + " (nothing was deleted)."
        )
    if overwrite:
        foreign = [n for n in entries if n not in RUN_FILES and not is_temporary(n)]
        if foreign:
            raise ValueError(
                f"--overwrite refuses --workdir={workdir!r}: besides a run it holds files the "
                f"run did not write: {_listing(foreign)}. Move them away or choose another "
                "--workdir (nothing was deleted)."
            )
        return WorkdirPlan(workdir, "overwrite")
    run_dir = RunDir(workdir)
    flagfile = run_dir.flags_path
    # A field the saved flags lack was added to TrainConfig later: the run had its default.
    saved = {
        **config_lib.TrainConfig().flag_strings(),
        **(config_lib.read_flagfile(flagfile) if os.path.exists(flagfile) else {}),
    }
    wanted = config.flag_strings()
    differences = [
        f"{key}: saved {saved.get(key)!r}, now {wanted[key]!r}"
        for key in wanted
        if key not in config_lib.RESUMABLE_FIELDS and saved.get(key) != wanted[key]
    ]
    if differences:
        raise ValueError(
            f"--workdir={workdir!r} holds a run with a different configuration ("
            + "; ".join(differences)
            + "). Use another --workdir, or pass --overwrite to delete that run and "
            "start afresh (nothing was deleted)."
        )
    trained = run_dir.epochs_recorded()
    if trained > config.epochs:
        raise ValueError(
            f"--workdir={workdir!r} holds a run already trained for {trained} epochs; "
            f"epochs={config.epochs} would not continue it. Pass --epochs >= {trained}, or "
            "--overwrite to start afresh (nothing was deleted)."
        )
    summary = run_dir.read_summary()
    if summary and summary.get("status") == "done" and summary.get("epochs") == config.epochs:
        return WorkdirPlan(workdir, "done", summary=summary)
    return WorkdirPlan(workdir, "resume")


def make_workdir(plan: WorkdirPlan, config: config_lib.TrainConfig) -> None:
    """Carries out `plan`: creates the run directory (or empties a run for "overwrite").

    Writes the marker and flags.txt (flags.txt gets the new resumable fields on
    a resume). A "done" plan changes nothing.
    """
    if plan.action == "done":
        return
    run_dir = RunDir(plan.workdir)
    if plan.action == "overwrite":
        run_dir.remove_run_files()  # check_workdir refused a run holding anything else
    run_dir.create(config.to_flagfile() + f"--workdir={plan.workdir}\n")


def prepare_workdir(
    workdir: str, config: config_lib.TrainConfig, overwrite: bool = False
) -> WorkdirPlan:
    """`check_workdir`, then `make_workdir`; returns the plan.

    Raises:
        ValueError: as `check_workdir`; nothing is created or deleted then.
    """
    plan = check_workdir(workdir, config, overwrite=overwrite)
    make_workdir(plan, config)
    return plan


def read_run_config(workdir: str) -> config_lib.TrainConfig:
    """The config a run was made with, from its flags.txt (less the `--workdir` line).

    Fields the file lacks were added to `TrainConfig` after the run: it had their defaults.

    Raises:
        FileNotFoundError: the directory has no flags.txt.
        ValueError: the file does not parse as a config.
    """
    values = config_lib.read_flagfile(RunDir(workdir).flags_path)
    values.pop("workdir", None)
    return config_lib.config_from_strings(values)
