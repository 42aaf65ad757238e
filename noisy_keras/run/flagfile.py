"""Flagfiles and the recipes shipped with the package, found from any working directory.

A recipe is an absl flagfile shipped with the package (`flags/` in the source
tree, installed as the package `noisy_keras.flagfiles`); its name is the file
name without `.flags` (`digits_b1024_noise`). The command lines take
`--recipe=NAME`, and `--flagfile=` accepts a path or a recipe's name.

Where `--flagfile=X` points (`resolve`), first match wins:

1. inside a flagfile, X relative to that flagfile's own directory, so a
   recipe's includes (`--flagfile=repro_digits.flags`) work wherever the
   package is installed and whatever the working directory;
2. X as a path, absolute or relative to the working directory;
3. X as the name of a recipe (with or without `.flags`).

`expand_argv(argv)` replaces every `--flagfile=X` and `--recipe=NAME` of a
command line, in place, by the flags the file holds, includes followed; flags
given after it override it, as with absl's own flagfiles (`--recipe=NAME`
itself stays, so the command line's `--recipe` flag records it). `flag_lines`
gives a file's flags the same way. Lines: blank, `#` or `//` comments, or one
flag each, as absl reads them. Imports no TensorFlow.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence

__all__ = [
    "FlagfileError",
    "FlagfileNotFoundError",
    "RECIPE_SUFFIX",
    "expand_argv",
    "flag_entries",
    "flag_lines",
    "recipe_names",
    "recipes",
    "resolve",
]

RECIPE_SUFFIX = ".flags"
_DIRECTIVES = ("--flagfile", "-flagfile")
_RECIPE_FLAGS = ("--recipe", "-recipe")


class FlagfileError(ValueError):
    """A flagfile or recipe that cannot be used: names it and what is allowed."""


class FlagfileNotFoundError(FlagfileError, FileNotFoundError):
    """A flagfile, include or recipe that does not exist."""


def _recipe_directory() -> str:
    # A source checkout run without installing (flags/ next to the package) reads the
    # repository's files; an installed package reads its own copies.
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # noisy_keras/
    checkout = os.path.join(os.path.dirname(package), "flags")
    if os.path.isfile(os.path.join(checkout, "__init__.py")):
        return checkout
    return str(importlib.resources.files("noisy_keras.flagfiles"))


def recipes() -> dict[str, str]:
    """The shipped recipes: {file name (`NAME.flags`): absolute path}, sorted by name."""
    directory = _recipe_directory()
    return {
        name: os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.endswith(RECIPE_SUFFIX)
    }


def recipe_names() -> list[str]:
    """The names `--recipe` takes: the shipped files without `.flags`."""
    return [name[: -len(RECIPE_SUFFIX)] for name in recipes()]


def resolve(name_or_path: str, relative_to: str | None = None, argument: str = "flagfile") -> str:
    """The path a `--flagfile=` (or `--recipe=`) value points to (the order: module doc).

    Args:
        name_or_path: a path or a recipe's name.
        relative_to: the directory of the flagfile that includes it (None on a command line).
        argument: the flag being resolved, for the error message.

    Raises:
        FlagfileNotFoundError: none of the three matches; the message lists the recipes.
    """
    if not name_or_path:
        raise FlagfileError(f"--{argument} is empty; give a path or a recipe's name.")
    if relative_to is not None and not os.path.isabs(name_or_path):
        beside = os.path.join(relative_to, name_or_path)
        if os.path.isfile(beside):
            return beside
    if argument != "recipe" and os.path.isfile(name_or_path):
        return name_or_path
    shipped = recipes()
    if os.path.basename(name_or_path) == name_or_path:
        for candidate in (name_or_path, f"{name_or_path}{RECIPE_SUFFIX}"):
            if candidate in shipped:
                return shipped[candidate]
    what = "is not a recipe" if argument == "recipe" else "is neither a file nor a recipe"
    raise FlagfileNotFoundError(
        f"--{argument}={name_or_path!r} {what} shipped with the package; recipes: "
        f"{', '.join(recipe_names())}."
    )


def _directive(argument: str, names: Sequence[str]) -> str | None:
    """The value of `--name=value` for one of `names`, else None."""
    for name in names:
        if argument.startswith(f"{name}="):
            return argument[len(name) + 1 :]
    return None


def flag_lines(path: str) -> list[str]:
    """The flags of the flagfile at `path`, in order, its includes expanded in place.

    Raises:
        FlagfileError: the file (or an include) does not exist or includes itself.
    """
    return [line for _, _, line in flag_entries(path)]


def flag_entries(path: str, _stack: tuple[str, ...] = ()) -> list[tuple[str, int, str]]:
    """`flag_lines` with where each line comes from: (file, line number, flag).

    Raises:
        FlagfileError: the file (or an include) does not exist or includes itself.
    """
    real = os.path.realpath(path)
    if real in _stack:
        chain = " -> ".join(os.path.basename(p) for p in (*_stack, real))
        raise FlagfileError(f"flagfile {path!r} includes itself: {chain}.")
    if not os.path.isfile(path):
        raise FlagfileNotFoundError(f"flagfile {path!r} does not exist.")
    entries = []
    with open(path) as file:
        for number, raw in enumerate(file, 1):
            line = raw.strip()
            if not line or line.startswith(("#", "//")):
                continue
            include = _directive(line, _DIRECTIVES)
            if include is None:
                entries.append((path, number, line))
                continue
            target = resolve(include, relative_to=os.path.dirname(path))
            entries.extend(flag_entries(target, (*_stack, real)))
    return entries


def expand_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with each `--flagfile=X` replaced by its flags and `--recipe=NAME` followed by them.

    `argv[0]` (the program) is kept; a bare `--` ends the flags, and what follows
    it is kept as it is. `--flagfile X` and `--recipe NAME` (two arguments) work too.

    Raises:
        FlagfileError: an unknown recipe, a missing flagfile or an include cycle.
    """
    argv = list(argv)
    expanded = argv[:1]
    index = 1
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            expanded.extend(argv[index:])
            break
        if argument in (*_DIRECTIVES, *_RECIPE_FLAGS) and index + 1 < len(argv):
            argument = f"{argument}={argv[index + 1]}"
            index += 1
        index += 1
        include = _directive(argument, _DIRECTIVES)
        recipe = _directive(argument, _RECIPE_FLAGS)
        if include is not None:
            expanded.extend(flag_lines(resolve(include)))
        elif recipe is not None:
            expanded.append(f"--recipe={recipe}")
            expanded.extend(flag_lines(resolve(recipe, argument="recipe")))
        else:
            expanded.append(argument)
    return expanded
