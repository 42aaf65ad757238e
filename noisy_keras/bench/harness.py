"""Measurement harness: interleaved step timing, spreads, load average, peak memory.

Figures taken on shared machines move with the load of other processes, so
every comparison is a ratio of medians measured side by side in one process:
the variants compared are run in alternating blocks (A B B A A B ...), so a
burst of outside load falls on both.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def median(values: Sequence[float]) -> float:
    """The median of `values` as a float."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict:
    """Median, min and max of `values` (None entries, e.g. 'never reached', left out)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": median(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


def interleaved_step_times(
    steps: dict[str, Callable[[], object]], *, rounds: int, steps_per_round: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating blocks.

    Rule: after `warmup` untimed calls of each function (tracing, XLA
    compilation, first-touch allocation), `rounds` rounds follow; in each
    round every function is called `steps_per_round` times in a row, each call
    timed on its own with `time.perf_counter`. The order of the functions is
    reversed every other round (A B, B A, A B, ...), so neither always runs
    first after the other. Each function must block until its work is done
    (e.g. end with `.numpy()`).

    Args:
        steps: name -> function with no arguments.
        rounds: rounds, >= 1.
        steps_per_round: timed calls per function per round, >= 1.
        warmup: untimed calls per function first, >= 0.

    Returns:
        name -> list of rounds * steps_per_round durations in seconds.
    """
    for name, value, minimum in (
        ("rounds", rounds, 1),
        ("steps_per_round", steps_per_round, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; received {name}={value!r}.")
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = steps[name]
            for _ in range(steps_per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    """The processor's model name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process' peak resident set size in bytes.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this
    program's own memory map. Not `ru_maxrss`: on Linux that starts from the
    parent's resident size at fork (the kernel carries it over at exec), so
    a child of a large process reports at least the parent's size. Elsewhere:
    `ru_maxrss` of RUSAGE_SELF (bytes on macOS, kB otherwise).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def run_children(commands: list[list[str]]) -> list[int]:
    """Runs the commands as concurrent child processes; returns the integer each prints last."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    children = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for c in commands
    ]
    values = []
    for child in children:
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(
                f"memory child {child.args!r} failed with exit code {child.returncode}:\n"
                + stderr[-2000:]
            )
        values.append(int(stdout.split()[-1]))
    return values


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"noisy_keras.bench: {message}", file=sys.stderr, flush=True)
