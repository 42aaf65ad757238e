r"""Benchmarks: what the noise costs, what the engine gains, time to accuracy, memory.

    python -m noisy_keras.bench                      # everything (10-20 min on 2 CPU cores)
    python -m noisy_keras.bench --quick              # smoke test: checks it runs, measures nothing
    noisy-keras-bench --parts=noise,memory --out=bench.json

Prints one Markdown table per part and writes every number to `--out` (JSON;
default bench.json, or bench-quick.json with --quick). A --quick run uses tiny
sizes and a few steps: its tables are labelled as a smoke test and its numbers
mean nothing. Set NOISY_KERAS_TF_LOGS=1 to see TensorFlow's own log lines.

Every comparison is a ratio of medians measured side by side in one process
(`noisy_keras.bench.harness`); the load average before and after each part is
recorded with it. Parts, one module each: noise (`noise_overhead`), noise_kinds
(`noise_kinds`: each noise kind's step time through the engine vs none), methods
(`methods`: SAM, adaptive SAM, the gradient-norm penalty both ways and weight
averaging, each one's update time vs plain SGD), engine,
memory, input (`input_pipeline`: streamed input throughput and peak memory
against dataset size), gpu_check (every registry model under MirroredStrategy +
XLA in mixed precision: checks, then throughput; exits with 1 if a check fails),
time_to_accuracy.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks".
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from noisy_keras.bench import harness, report
from noisy_keras.run import _cli

PART_MODULES = {
    "noise": "noise_overhead",
    "noise_kinds": "noise_kinds",
    "methods": "methods",
    "engine": "engine",
    "memory": "memory",
    "input": "input_pipeline",
    "gpu_check": "gpu_check",
    "time_to_accuracy": "time_to_accuracy",
}
"""Benchmark parts in the order they run, each with its module in noisy_keras.bench."""
PART_NAMES = tuple(PART_MODULES)
SMOKE_TEST_NOTE = (
    "SMOKE TEST (--quick): tiny sizes and a few steps, to check that every part runs; "
    "these numbers measure nothing. Run without --quick for measurements."
)


def run_benchmarks(*, parts: Sequence[str] = PART_NAMES, quick: bool = False) -> dict:
    """Runs the chosen parts and returns their results with the machine's description.

    Parts run in the order noise, noise_kinds, methods, engine, memory, input, gpu_check,
    time_to_accuracy (the last one trains with the main job's defaults). For the
    engine and gpu_check parts the CPU must already be split into
    `ENGINE_DEVICES` logical devices when there is no GPU
    (`distribute.configure_logical_cpus`, before TensorFlow starts).

    Args:
        parts: names from `PART_NAMES`.
        quick: the smoke-test sizes (one small case per part, few steps).

    Returns:
        {"meta": {...}, and one entry per part}.
    """
    parts = list(parts)
    unknown = [p for p in parts if p not in PART_NAMES]
    if unknown or not parts:
        raise ValueError(
            f"parts must be a non-empty list of {', '.join(PART_NAMES)}; received {parts!r}."
        )
    import importlib

    import keras
    import tensorflow as tf

    start = time.time()
    results = {
        "meta": {
            "quick": quick,
            "parts": parts,
            "cpu": harness.cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average": {},
            "part_seconds": {},
        }
    }
    for name in [p for p in PART_MODULES if p in parts]:
        part_start = time.time()
        load_before = harness.load_average()
        harness.log(f"{name} ...")
        module = importlib.import_module(f"noisy_keras.bench.{PART_MODULES[name]}")
        results[name] = module.part(quick)
        results["meta"]["load_average"][name] = {
            "before": load_before,
            "after": harness.load_average(),
        }
        results["meta"]["part_seconds"][name] = round(time.time() - part_start, 1)
    results["meta"]["seconds"] = round(time.time() - start, 1)
    return results


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def define_flags() -> None:
    """Defines the benchmark's flags (idempotent)."""
    if "parts" in flags.FLAGS:
        return
    flags.DEFINE_bool("quick", False, "Smoke-test sizes: one small case per part, few steps.")
    flags.DEFINE_string(
        "out", "", "Where to write the results as JSON ('' = bench.json, or bench-quick.json)."
    )
    flags.DEFINE_list("parts", list(PART_NAMES), f"Parts to run, from {', '.join(PART_NAMES)}.")
    flags.register_validator(
        "parts",
        lambda v: bool(v) and all(p in PART_NAMES for p in v),
        message=f"--parts must be a comma-separated list of {', '.join(PART_NAMES)}.",
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    parts, quick = list(FLAGS.parts), FLAGS.quick
    out = FLAGS.out or ("bench-quick.json" if quick else "bench.json")
    if quick:
        print(SMOKE_TEST_NOTE)
    _cli.quiet_tensorflow()
    # TensorFlow logs every MirroredStrategy reduction at INFO; keep the console readable.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if "engine" in parts or "gpu_check" in parts:
        import tensorflow as tf

        from noisy_keras.bench.engine import ENGINE_DEVICES
        from noisy_keras.engine import distribute

        if not tf.config.list_physical_devices("GPU"):
            distribute.configure_logical_cpus(ENGINE_DEVICES)
    results = run_benchmarks(parts=parts, quick=quick)
    results["meta"]["command"] = " ".join(["python -m noisy_keras.bench", *sys.argv[1:]])
    if quick:
        results["meta"]["note"] = SMOKE_TEST_NOTE
    tables = report.format_tables(results)
    print(f"{SMOKE_TEST_NOTE}\n\n{tables}\n\n{SMOKE_TEST_NOTE}" if quick else tables)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    kind = "smoke test" if quick else "results"
    print(f"noisy_keras.bench: wrote the {kind} to {out} in {results['meta']['seconds']:.0f}s")
    failed = results.get("gpu_check", {}).get("failed")
    if failed:
        print(f"noisy_keras.bench: gpu_check FAILED for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point (`noisy-keras-bench`)."""
    define_flags()
    _cli.run_app(main, "noisy_keras.bench")
