"""Benchmark part "input": is a run input-bound, and does its memory grow with the dataset?

* Input throughput: images/s of the streamed folder pipeline
  (`noisy_keras.data.streaming`: read, decode, preprocess, batch) on generated
  JPEGs of ImageNet-like size, with one thread (the figure per core) and with
  every core, next to the training step rate of the model the images feed.
  A run is input-bound when the model's images/s exceeds what the input
  cores deliver: cores needed = model images/s / images/s per core.
* Peak resident memory of a one-epoch main-job run (`noisy_keras.train`, a
  fresh process) on generated folders of N JPEGs, streamed and held in
  memory (the smoke run: streamed only): streamed, the peak does not grow
  with N.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from noisy_keras.bench import harness, workloads
from noisy_keras.data import datasets
from noisy_keras.models import zoo as models

# Typical ImageNet photo: 500 x 375 pixels, about 110 KB as JPEG.
PHOTO_SHAPE = (375, 500)


def write_jpeg_folder(
    root: str, num_images: int, shape: tuple[int, int], classes: int = 10, seed: int = 0
):
    """Writes `num_images` JPEGs (quality 90) in `classes` class folders under `root`.

    Images are smooth random fields plus pixel noise, so they compress and
    decode like photographs rather than like white noise.

    Returns:
        Total bytes written.
    """
    rng = np.random.default_rng(seed)
    total = 0
    for label in range(classes):
        os.makedirs(os.path.join(root, f"class_{label:03d}"), exist_ok=True)
    for index in range(num_images):
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype("float32")
        smooth = tf.image.resize(coarse, shape, method="bicubic").numpy()
        noisy = smooth + rng.normal(0, 8, size=smooth.shape)
        image = np.clip(noisy, 0, 255).astype(np.uint8)
        encoded = tf.io.encode_jpeg(image, quality=90)
        path = os.path.join(root, f"class_{index % classes:03d}", f"{index:06d}.jpg")
        tf.io.write_file(path, encoded)
        total += len(encoded.numpy())
    return total


def measure_input_throughput(
    root: str, *, image_size: int, preprocess: str, threads: int, batch_size: int, batches: int
) -> dict:
    """Images/s of the streamed folder pipeline with `threads` tf.data threads.

    The training stream (`train_batches(batch_size, seed=0)`, epoch after
    epoch), with tf.data's private thread pool set to `threads` and one
    thread per op; one batch is read first (untimed: file cache, thread
    start-up), then `batches` batches are timed.
    """
    data = datasets.load_dataset(
        f"folder:{root}", image_size=image_size, streaming="true", preprocess=preprocess
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    pipeline = data.train_batches(batch_size, seed=0).with_options(options)
    iterator = iter(pipeline)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    images_per_s = batches * batch_size / seconds
    return {
        "preprocess": preprocess,
        "image_size": image_size,
        "threads": threads,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": seconds,
        "images_per_s": images_per_s,
        "images_per_s_per_thread": images_per_s / threads,
    }


def measure_model_rate(model: str, image_size: int, batch_size: int, steps: int) -> dict:
    """Training images/s of `model` (SGD with momentum, no XLA) on one device, synthetic batch.

    Two untimed steps (tracing), then the median of `steps` timed steps.
    """
    net = models.build_model(
        model, input_shape=(image_size, image_size, 3), num_classes=1000, seed=0
    )
    step = workloads.train_step(net, workloads.inner_optimizer("momentum"), jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, 1000, size=batch_size).astype("int32")
    times = harness.interleaved_step_times(
        {"step": lambda: step(x, y).numpy()}, rounds=1, steps_per_round=steps, warmup=2
    )["step"]
    step_s = harness.median(times)
    return {
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "step_ms": step_s * 1e3,
        "images_per_s": batch_size / step_s,
    }


def _main_job_command(root: str, image_size: int, streaming: str, batch_size: int) -> list:
    """A fresh Python running the main job for one epoch, printing its peak RSS as it exits."""
    workdir = tempfile.mkdtemp(prefix="noisy_keras_bench_")
    argv = [
        "noisy_keras.train",
        f"--dataset=folder:{root}",
        "--model=mlp",
        f"--image_size={image_size}",
        f"--streaming={streaming}",
        f"--batch_size={batch_size}",
        "--epochs=1",
        "--verbose=0",
        "--xla=false",
        f"--workdir={workdir}",
    ]
    code = (
        "import atexit, sys\n"
        "from noisy_keras.bench import harness\n"
        "atexit.register(lambda: print(harness.peak_rss_bytes(), flush=True))\n"
        f"sys.argv = {argv!r}\n"
        "from noisy_keras.run import train\n"
        "train.run()\n"
    )
    return [sys.executable, "-c", code]


def measure_run_memory(runs, *, batch_size: int) -> list[int]:
    """Peak RSS (bytes) of one-epoch main-job runs, one fresh process each, run concurrently.

    Each run is `python -m noisy_keras.train --dataset=folder:ROOT --model=mlp
    --epochs=1 --streaming=...` for (root, image_size, streaming) in `runs`;
    each process reports its own high-water mark (`harness.peak_rss_bytes`)
    as it exits.
    """
    commands = [_main_job_command(root, size, mode, batch_size) for root, size, mode in runs]
    return harness.run_children(commands)


def part(quick: bool) -> dict:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        photos = os.path.join(scratch, "photos")
        if quick:
            photo_count, photo_shape = 24, (90, 120)
            runs = [("resize", 64, 1, 8, 2), ("resnet", 64, 1, 8, 2)]
            model_rate = measure_model_rate("mlp", 32, 8, 2)
            sizes, side, memory_batch, modes = (24, 72), 32, 8, ("true",)
        else:
            photo_count, photo_shape = 512, PHOTO_SHAPE
            runs = [
                (preprocess, 224, threads, 32, 12)
                for preprocess in ("resize", "resnet")
                for threads in sorted({1, cores})
            ]
            model_rate = measure_model_rate("resnet50", 224, 16, 5)
            sizes, side, memory_batch, modes = (300, 3000), 96, 32, ("true", "false")
        photo_bytes = write_jpeg_folder(photos, photo_count, photo_shape)
        throughput = []
        for preprocess, size, threads, batch, batches in runs:
            throughput.append(
                measure_input_throughput(
                    photos,
                    image_size=size,
                    preprocess=preprocess,
                    threads=threads,
                    batch_size=batch,
                    batches=batches,
                )
            )
            harness.log(f"input {preprocess} threads={threads}: done")
        for row in throughput:
            row["cores_to_feed_model"] = model_rate["images_per_s"] / row["images_per_s_per_thread"]
        folders = {}
        for count in sizes:
            folders[count] = os.path.join(scratch, f"folder_{count}")
            write_jpeg_folder(folders[count], count, (side, side))
        runs = [(count, mode) for count in sizes for mode in modes]
        peaks = measure_run_memory(
            [(folders[count], side, mode) for count, mode in runs], batch_size=memory_batch
        )
        harness.log("input memory: done")
        memory = [
            {"images": count, "image_size": side, "streaming": mode, "peak_mb": peak / 2**20}
            for (count, mode), peak in zip(runs, peaks)
        ]
    peak = {(m["images"], m["streaming"]): m["peak_mb"] for m in memory}
    growth = {mode: peak[(sizes[1], mode)] - peak[(sizes[0], mode)] for mode in modes}
    return {
        "cores": cores,
        "photos": {"images": photo_count, "shape": list(photo_shape), "bytes": photo_bytes},
        "throughput": throughput,
        "model": model_rate,
        "memory": memory,
        "memory_growth_mb": growth,
    }
