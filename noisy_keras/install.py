"""Installing the package beside the TensorFlow and Keras already there (Colab's), keeping them.

Colab ships its own TensorFlow and Keras, built for its runtime; a `pip install` that
upgrades them leaves the running kernel with the old ones loaded and the new ones on disk.
`requirements()` says what to install so that pip keeps each of the two as it is whenever
the installed version is within the range the package supports (it pins it), and asks for
a supported version only where the installed one is outside that range (then the runtime
must be restarted once). The range is read from the installed package's own metadata
(`setup.cfg`'s `install_requires`), never written twice.

The notebooks' first cell, in a Colab runtime:

    SOURCE = "git+https://github.com/noisy-keras/noisy_keras"
    %pip install -q --no-deps "noisy_keras @ {SOURCE}"
    from noisy_keras import install
    install.install_beside_installed(f"noisy_keras[all] @ {SOURCE}")

The module itself imports nothing of the package and neither TensorFlow nor Keras (importing
it runs the package's `__init__`, which imports the Keras that Colab ships).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess
import sys

KEPT = ("tensorflow", "keras")
"""The distributions an existing installation's version of is kept when it is supported."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `pip install` is asked for, and why.

    Attributes:
        requirements: the arguments for `pip install`: the package, then one requirement
            per kept distribution.
        kept: the distributions pinned to their installed, supported version.
        changed: (name, installed version or None, supported range) for each
            distribution pip must install or replace; after that a running Python
            process (a notebook's kernel) must be restarted.
    """

    requirements: tuple[str, ...]
    kept: tuple[str, ...]
    changed: tuple[tuple[str, str | None, str], ...]


def supported_ranges(distribution: str = "noisy_keras") -> dict[str, str]:
    """The version ranges the installed package declares for TensorFlow and Keras.

    Raises:
        ValueError: the package is not installed, or does not declare one of them.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ValueError(f"distribution={distribution!r} is not installed.") from error
    ranges = {}
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in KEPT and requirement.marker is None:  # an extra's requirement has a marker
            ranges[name] = str(requirement.specifier)
    missing = [name for name in KEPT if name not in ranges]
    if missing:
        raise ValueError(f"{distribution} declares no version range for {', '.join(missing)}.")
    return ranges


def requirements(
    package: str,
    *,
    installed: dict[str, str | None] | None = None,
    ranges: dict[str, str] | None = None,
) -> Plan:
    """What to install so that a supported TensorFlow and Keras already there stay as they are.

    Args:
        package: the package's requirement, e.g. ``"noisy_keras[all]"`` or
            ``"noisy_keras[all] @ git+https://github.com/noisy-keras/noisy_keras"``.
        installed: name -> installed version (None: not installed); default: read
            from this environment.
        ranges: name -> supported range, e.g. ``">=2.20,<2.22"``; default: the
            installed package's declaration (`supported_ranges`).

    Returns:
        A `Plan`: ``package``, then ``name==version`` for each supported installed
        version, or ``name<range>`` where none is installed or it is outside the range.

    Raises:
        ValueError: `package` is empty, or a range cannot be parsed.
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not isinstance(package, str) or not package.strip():
        raise ValueError(f"package must be a requirement string; received package={package!r}.")
    ranges = supported_ranges() if ranges is None else ranges
    if installed is None:
        installed = {name: _installed_version(name) for name in KEPT}
    found, kept, changed = [package], [], []
    for name in KEPT:
        try:
            allowed = SpecifierSet(ranges[name])
        except InvalidSpecifier as error:
            message = f"ranges[{name!r}]={ranges[name]!r} is not a version range."
            raise ValueError(message) from error
        version = installed.get(name)
        try:
            supported = version is not None and allowed.contains(Version(version), prereleases=True)
        except InvalidVersion:
            supported = False
        if supported:
            found.append(f"{name}=={version}")
            kept.append(name)
        else:
            found.append(f"{name}{ranges[name]}")
            changed.append((name, version, ranges[name]))
    return Plan(tuple(found), tuple(kept), tuple(changed))


def install_beside_installed(package: str, *, quiet: bool = True, run=None) -> Plan:
    """Runs `pip install` with `requirements(package)` in this Python; prints what it kept.

    Args:
        package: as in `requirements`.
        quiet: pass ``-q`` to pip.
        run: the function that runs the command; default `subprocess.check_call`.

    Returns:
        The `Plan` it installed. Where it names distributions in ``changed``, restart
        the runtime (Colab: Runtime > Restart session) before importing them.
    """
    plan = requirements(package)
    flags = ["-q"] if quiet else []
    command = [sys.executable, "-m", "pip", "install", *flags, *plan.requirements]
    (subprocess.check_call if run is None else run)(command)
    for name in plan.kept:
        print(f"noisy_keras.install: kept the installed {name}=={_installed_version(name)}")
    for name, version, allowed in plan.changed:
        was = f"{version}, outside {allowed}" if version else "none installed"
        print(f"noisy_keras.install: installed a supported {name} ({was}); restart the runtime")
    return plan


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
