"""Measures training steps/s of the engine: XLA vs not, 1 device vs 2 replicas.

Not a test (timings never go in tests). Run from the repository root:

    python tests/engine/measure_replica_xla.py [--model mlp|cnn] [--steps 40] [--batch 256]

Each configuration trains the same model on random data for `--steps` timed
steps after 5 warm-up steps (which include tracing and XLA compilation), and
prints steps/s; ratios are only meaningful within one run on one machine.
`--compile-update` also wraps the optimizer's per-variable update in
`tf.function(jit_compile=True)` to check whether the update can run under
XLA per replica.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from noisy_keras.engine import distribute  # noqa: E402

distribute.configure_logical_cpus(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from noisy_keras.engine import steps as replica_xla  # noqa: E402


def _model(kind):
    if kind == "cnn":
        return keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def measure(kind, replicas, xla, steps, batch, compile_update=False):
    strategy = distribute.make_strategy("default" if replicas == 1 else "mirrored", replicas)
    shape = (32, 32, 3) if kind == "cnn" else (784,)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * 4, *shape)).astype("float32")
    y = rng.integers(0, 10, size=batch * 4)
    with strategy.scope():
        model = _model(kind)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        if compile_update:
            model.optimizer.update_step = tf.function(model.optimizer.update_step, jit_compile=True)
    replica_xla.enable_replica_xla(model, jit_compile=xla)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat().prefetch(2)
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--compile-update", action="store_true")
    args = parser.parse_args()
    print(
        f"model={args.model} global batch={args.batch} devices={tf.config.list_logical_devices()}"
    )
    for replicas in (1, 2):
        for xla in (False, True):
            rate = measure(args.model, replicas, xla, args.steps, args.batch, args.compile_update)
            print(f"replicas={replicas} xla={xla!s:5} steps/s={rate:8.2f}", flush=True)
            keras.utils.clear_session()


if __name__ == "__main__":
    main()
