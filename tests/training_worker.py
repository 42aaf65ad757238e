"""A small training run in its own process, for the multi-worker and kill-and-resume tests.

Usage:
    python tests/training_worker.py --workdir DIR --out WEIGHTS.npz [--strategy multiworker]
        [--num-devices 2] [--pause-at EPOCH,BATCH] [--epochs 3] [--steps-per-epoch 4]

It trains a small MLP (with Dropout, so RNG state is part of the run) on a
fixed synthetic data set with `noisy_keras.training.fit`, under op
determinism, and writes the final weights to `--out`. `--pause-at e,b`
prints "PAUSED" after batch b of epoch e and sleeps, so that a test can kill
it there with SIGKILL. Every finished batch prints "BATCH e b".
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

from noisy_keras import data, distribute, training  # noqa: E402
from noisy_keras.optimizer import NoisyOptimizer  # noqa: E402


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


def _build_model():
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(3),
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


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--num-devices", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--pause-at", default=None)
    args = parser.parse_args(argv)
    pause_at = tuple(int(v) for v in args.pause_at.split(",")) if args.pause_at else None

    tf.config.experimental.enable_op_determinism()
    strategy = distribute.make_strategy(args.strategy, args.num_devices)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    train_data = data.epoch_batches((x, y), batch_size=16, seed=5)
    result = training.fit(
        _build_model,
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
