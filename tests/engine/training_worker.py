"""A small training run in its own process, for the multi-worker and kill-and-resume tests.

Usage:
    python tests/engine/training_worker.py --workdir DIR --out WEIGHTS.npz [--strategy multiworker]
        [--num-devices 2] [--pause-at EPOCH,BATCH] [--epochs 3] [--steps-per-epoch 4]
        [--folder PATH --preprocess resize|resnet --batch-size 12 --reads READS.json]

It trains a small MLP (with Dropout, so RNG state is part of the run) on a
fixed synthetic data set with `noisy_keras.engine.fit.fit`, under op
determinism, and writes the final weights to `--out`. `--pause-at e,b`
prints "PAUSED" after batch b of epoch e and sleeps, so that a test can kill
it there with SIGKILL. Every finished batch prints "BATCH e b".

With `--folder`, the data is that image folder streamed from disk
(`noisy_keras.data.datasets.load_dataset(..., streaming="true")`, 8x8 images) and
the model a small MLP on them; `--reads` writes the example identities
(pixel (0, 0): red + 256 x green, see tests/engine/test_multiworker.py) that this
worker's input pipeline yields in epoch 0, read through the same
`training.train_stream` that `fit` trains on.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from noisy_keras.data import datasets
from noisy_keras.data.epochs import epoch_batches  # noqa: E402
from noisy_keras.engine import distribute
from noisy_keras.engine import fit as training
from noisy_keras.noise.optimizer import NoisyOptimizer  # noqa: E402


class _Progress(keras.callbacks.Callback):
    def __init__(self, pause_at):
        super().__init__()
        self.pause_at = pause_at
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        print(f"BATCH {self.epoch} {batch}", flush=True)
        if self.pause_at == (self.epoch, batch):
            print("PAUSED", flush=True)
            time.sleep(600)


def _build_model(input_shape=(6,), num_classes=3):
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(num_classes),
        ]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=3, decay_rate=0.7)
    optimizer = NoisyOptimizer(
        keras.optimizers.SGD(schedule, momentum=0.9), alpha=1e-3, gamma=0.55, seed=11
    )
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _write_reads(args, strategy, train_data):
    """Writes the identities of the examples this worker's pipeline yields in epoch 0."""
    stream = training.train_stream(train_data, strategy, 0, 1, args.steps_per_epoch)
    reads = []
    for step, batch in zip(range(args.steps_per_epoch), stream):
        for x in strategy.experimental_local_results(batch[0]):
            pixels = np.rint(np.asarray(x)[:, 0, 0, :2] * 255).astype(int)
            reads.append([step, (pixels[:, 0] + 256 * pixels[:, 1]).tolist()])
    with open(args.reads, "w") as f:
        json.dump(reads, f)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--num-devices", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--pause-at", default=None)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--preprocess", default="resize")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reads", default=None)
    args = parser.parse_args(argv)
    pause_at = tuple(int(v) for v in args.pause_at.split(",")) if args.pause_at else None

    tf.config.experimental.enable_op_determinism()
    strategy = distribute.make_strategy(args.strategy, args.num_devices)
    if args.folder:
        images = datasets.load_dataset(
            f"folder:{args.folder}",
            image_size=8,
            seed=0,
            streaming="true",
            preprocess=args.preprocess,
        )
        train_data = images.train_epochs(args.batch_size, seed=5)
        build = lambda: _build_model(images.input_shape, images.num_classes)
        if args.reads:
            _write_reads(args, strategy, train_data)
    else:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 6)).astype("float32")
        y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
        train_data = epoch_batches((x, y), batch_size=args.batch_size, seed=5)
        build = _build_model
    result = training.fit(
        build,
        train_data,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        workdir=args.workdir,
        strategy=strategy,
        xla=True,
        callbacks=[_Progress(pause_at)],
        verbose=0,
    )
    weights = {f"w{i}": np.asarray(v) for i, v in enumerate(result.model.weights)}
    weights["iterations"] = np.asarray(result.model.optimizer.iterations)
    np.savez(args.out, **weights)
    summary = {
        "status": result.status,
        "initial_epoch": result.initial_epoch,
        "epochs_completed": result.epochs_completed,
        "loss": result.history.get("loss", []),
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
