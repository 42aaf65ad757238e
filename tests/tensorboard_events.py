"""Reads the scalars of TensorBoard event files back, for tests."""

import glob
import os

import tensorflow as tf


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file directly in `log_dir` (a later write wins)."""
    scalars: dict[str, dict[int, float]] = {}
    paths = sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    assert paths, f"no event file in {log_dir}"
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = (
                    float(tf.make_ndarray(value.tensor))
                    if value.HasField("tensor")
                    else float(value.simple_value)
                )
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return scalars
