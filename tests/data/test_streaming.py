"""Streamed datasets: same batches as in memory, nothing materialised, per-replica shards, TFDS."""

import contextlib
import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tfds_metadata import write_tfds_metadata

from noisy_keras import _keras_internals
from noisy_keras.data import datasets, sources, streaming
from noisy_keras.data import pipeline as data
from noisy_keras.data import shards as input_shards
from noisy_keras.engine import distribute
from noisy_keras.engine import fit as training
from noisy_keras.models import zoo as models


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Four classes of 12 random PNGs of varying sizes: 36 training, 12 validation images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(4):
        (root / f"class_{label}").mkdir()
        for i in range(12):
            image = rng.integers(0, 256, size=(10 + i, 14 + label, 3), dtype=np.uint8)
            tf.io.write_file(str(root / f"class_{label}" / f"{i:02d}.png"), tf.io.encode_png(image))
    return root


def _load(root, **kwargs):
    return datasets.load_dataset(f"folder:{root}", image_size=8, seed=3, **kwargs)


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("augment", [False, True])
def test_streamed_folder_gives_the_in_memory_batches_bit_for_bit(image_folder, augment):
    in_memory, streamed = _load(image_folder, streaming="false"), _load(image_folder)
    assert isinstance(in_memory, data.ClassificationData)
    assert isinstance(streamed, streaming.StreamedImageData) is False  # 9 KB decoded: auto keeps it
    streamed = _load(image_folder, streaming="true")
    assert isinstance(streamed, streaming.StreamedImageData)
    assert (streamed.num_train, streamed.num_val, streamed.input_shape) == (36, 12, (8, 8, 3))
    assert streamed.validation == in_memory.validation
    # Three epochs of 3 batches, and the stream resumed at epoch 2.
    expected = list(
        in_memory.train_batches(12, seed=5, augment=augment).take(9).as_numpy_iterator()
    )
    actual = list(streamed.train_batches(12, seed=5, augment=augment).take(9).as_numpy_iterator())
    _assert_same_batches(expected, actual)
    resumed = streamed.train_batches(12, seed=5, first_epoch=2, augment=augment, epochs=3)
    _assert_same_batches(expected[6:], list(resumed.as_numpy_iterator()))
    for pad in (False, True):
        _assert_same_batches(
            list(in_memory.val_batches(5, pad_remainder=pad).as_numpy_iterator()),
            list(streamed.val_batches(5, pad_remainder=pad).as_numpy_iterator()),
        )
    x_sample, y_sample = streamed.train_sample(5)
    x_all, y_all = in_memory.train_arrays()
    np.testing.assert_array_equal(x_sample, x_all[:5])
    np.testing.assert_array_equal(y_sample, y_all[:5])


def test_folder_split_is_the_seeded_stratified_split(image_folder):
    streamed = _load(image_folder, streaming="true")
    labels = np.repeat(np.arange(4), 12)
    paths = np.array(
        [str(image_folder / f"class_{c}" / f"{i:02d}.png") for c in range(4) for i in range(12)]
    )
    train, val = data.stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(streamed.source.train_paths, paths[train])
    np.testing.assert_array_equal(streamed.source.val_labels, labels[val])
    other = datasets.load_dataset(f"folder:{image_folder}", image_size=8, seed=4, streaming="true")
    assert set(other.source.val_paths) != set(streamed.source.val_paths)


def _largest_constant_bytes(graph_def) -> int:
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return max(n.attr["value"].tensor.ByteSize() for n in nodes if n.op == "Const")


def _op_types(graph_def) -> set:
    ops = {n.op for n in graph_def.node}
    for function in graph_def.library.function:
        ops |= {n.op for n in function.node_def}
    return ops


def test_streamed_pipeline_never_materialises_the_dataset(image_folder):
    """Structural: the graph's constants are at most the file list; images exist only per batch."""
    streamed = _load(image_folder, streaming="true", preprocess="resnet")
    in_memory = _load(image_folder, streaming="false")
    file_list_bytes = sum(len(p.encode()) + 8 for p in streamed.source.train_paths)
    dataset_bytes = in_memory.num_train * int(np.prod(in_memory.input_shape))
    assert file_list_bytes < dataset_bytes  # else the check below could not tell them apart
    for pipeline in (
        streamed.train_epochs(8, seed=0)(0),
        streamed.train_batches(8, seed=0),
        streamed.val_batches(8),
        streamed.train_eval_batches(8),
    ):
        graph = _keras_internals.dataset_graph_def(pipeline)
        assert _largest_constant_bytes(graph) <= file_list_bytes
        ops = _op_types(graph)
        assert "ReadFile" in ops and not ops & {"CacheDatasetV2", "SnapshotDatasetV2"}
    # The same check fails on the in-memory pipeline, which captures every image.
    graph = _keras_internals.dataset_graph_def(in_memory.train_epochs(8, seed=0)(0))
    assert _largest_constant_bytes(graph) >= dataset_bytes


def test_loading_a_streamed_folder_reads_no_image(image_folder, tmp_path):
    for label in range(2):
        (tmp_path / f"c{label}").mkdir()
        for i in range(4):
            (tmp_path / f"c{label}" / f"{i}.png").write_bytes(
                (image_folder / "class_0" / "00.png").read_bytes()
            )
    streamed = _load(tmp_path, streaming="true")
    epoch = streamed.train_epochs(2, seed=0)(0)
    for path in tmp_path.glob("*/*.png"):
        path.unlink()
    with pytest.raises(tf.errors.NotFoundError):
        next(iter(epoch))


def test_shard_positions_cover_every_position_once_in_replica_order():
    batch_size, steps, replicas = 12, 3, 4
    shards = [
        input_shards.input_shard(tf.distribute.InputContext(2, pipeline, replicas))
        for pipeline in range(2)
    ]
    assert [(s.first_replica, s.local_replicas) for s in shards] == [(0, 2), (2, 2)]
    positions = [input_shards.shard_positions(batch_size, steps, s) for s in shards]
    np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(36))
    # Step 1: pipeline 0 feeds replicas 0 and 1 (positions 12..17), pipeline 1 replicas 2, 3.
    np.testing.assert_array_equal(positions[0][6:12], np.arange(12, 18))
    np.testing.assert_array_equal(positions[1][6:12], np.arange(18, 24))
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 4 replicas"):
        input_shards.shard_positions(10, steps, shards[0])


@pytest.mark.parametrize(
    "kind, options",
    [
        ("memory", {"streaming": "false", "augment": True}),
        ("streamed", {"streaming": "true", "augment": True}),
        ("streamed", {"streaming": "true", "preprocess": "resnet"}),
    ],
)
def test_four_replicas_on_two_pipelines_read_the_global_batches(image_folder, kind, options):
    options = dict(options)
    augment = options.pop("augment", False)
    dataset = _load(image_folder, **options)
    sharded = dataset.train_epochs(12, seed=3, augment=augment)
    global_batches = list(sharded(1).as_numpy_iterator())
    pipelines = [
        list(sharded.for_pipeline(tf.distribute.InputContext(2, i, 4))(1).as_numpy_iterator())
        for i in range(2)
    ]
    assert len(global_batches) == 3 and [len(p) for p in pipelines] == [6, 6]
    for step, (x, y) in enumerate(global_batches):
        parts = pipelines[0][2 * step : 2 * step + 2] + pipelines[1][2 * step : 2 * step + 2]
        assert all(len(part[1]) == 3 for part in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_mirrored_fit_on_per_replica_input_matches_the_split_global_batches(image_folder):
    """`fit` hands a ShardedEpochs to distribute_datasets_from_function; the weights equal,
    bit for bit, those of Keras splitting the same global batches over the two replicas."""
    dataset = _load(image_folder, streaming="true")
    strategy = distribute.make_strategy("mirrored", 2)
    sharded = dataset.train_epochs(12, seed=3, augment=True)
    plain = lambda epoch: sharded(epoch)  # a function: one stream of global batches
    assert isinstance(
        training.train_stream(sharded, strategy, 0, 2, 3), tf.distribute.DistributedDataset
    )
    assert isinstance(training.train_stream(plain, strategy, 0, 2, 3), tf.data.Dataset)

    def build():
        model = models.build_model("mlp", input_shape=(8, 8, 3), num_classes=4, seed=0)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    weights = []
    for train_data in (sharded, plain):
        result = training.fit(
            build, train_data, epochs=2, steps_per_epoch=3, strategy=strategy, xla=False, verbose=0
        )
        weights.append([np.asarray(v) for v in result.model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_analysis_arrays_are_refused_for_streamed_sets_with_what_to_use(image_folder):
    streamed = _load(image_folder, streaming="true")
    with pytest.raises(ValueError, match=r"streamed from disk .* train_eval_batches.*train_sample"):
        streamed.train_arrays()
    x, y = streamed.train_sample(100)
    assert x.shape == (36, 8, 8, 3) and y.shape == (36,)


def test_auto_streams_above_the_memory_limit(image_folder, monkeypatch):
    assert isinstance(_load(image_folder), data.ClassificationData)
    monkeypatch.setattr(streaming, "IN_MEMORY_LIMIT_BYTES", 48 * 8 * 8 * 3 - 1)
    assert isinstance(_load(image_folder), streaming.StreamedImageData)
    assert isinstance(_load(image_folder, streaming="false"), data.ClassificationData)
    with pytest.raises(ValueError, match=r"preprocess='resnet' .* received streaming='false'"):
        _load(image_folder, streaming="false", preprocess="resnet")
    with pytest.raises(ValueError, match=r"needs a tfds:NAME or folder:PATH dataset; 'digits'"):
        datasets.load_dataset("digits", streaming="true")


# ---------------------------------------------------------------------------
# TFDS (mocked, with the split sizes of a prepared dataset)
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _recording_reads(calls):
    """Inside mock_data: records every `as_dataset` call as (split, shuffle_files, read_config).

    Entered and left inside `mock_data`, so TFDS is restored exactly as mock_data left it.
    """
    mocked = tfds.core.DatasetBuilder.as_dataset

    def as_dataset(self, split, **kwargs):
        calls.append((split, kwargs.get("shuffle_files"), kwargs.get("read_config")))
        return mocked(self, split=split, **kwargs)

    with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", as_dataset):
        yield


def test_tfds_epochs_are_functions_of_seed_and_epoch(tmp_path):
    calls = []
    data_dir = write_tfds_metadata(tmp_path, "imagenet2012", {"train": 24, "validation": 8})
    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir), _recording_reads(calls):
        images = datasets.load_dataset(
            "tfds:imagenet2012", data_dir=data_dir, image_size=16, preprocess="resnet"
        )
        assert isinstance(images, streaming.StreamedImageData)
        assert (images.num_train, images.num_val, images.input_shape) == (24, 8, (16, 16, 3))
        assert images.validation == "the dataset's own 'validation' split"
        sharded = images.train_epochs(8, seed=3)
        assert sharded.python_epochs
        epochs = [list(sharded(e).as_numpy_iterator()) for e in (0, 1, 0)]
        stream = list(images.train_batches(8, seed=3, first_epoch=0, epochs=3).as_numpy_iterator())
        resumed = list(images.train_batches(8, seed=3, first_epoch=1, epochs=3).as_numpy_iterator())
        val = list(images.val_batches(8).as_numpy_iterator())
    _assert_same_batches(epochs[0], epochs[2])
    assert not np.array_equal(epochs[0][0][1], epochs[1][0][1])  # reshuffled per epoch
    _assert_same_batches(stream[3:], resumed)
    assert [len(y) for _, y in epochs[0]] == [8, 8, 8] and epochs[0][0][0].shape == (8, 16, 16, 3)
    assert val[0][0].shape == (8, 16, 16, 3)
    train_reads = [c for c in calls if c[0] == "train"]
    seeds = [c[2].shuffle_seed for c in train_reads[:3]]
    assert seeds == [sources.derived_seed(3, e, 1) for e in (0, 1, 0)]
    assert all(c[1] is True and c[2].input_context is None for c in train_reads)
    assert [c[1] for c in calls if c[0] == "validation"] == [False]


def test_tfds_without_validation_split_holds_out_the_end_of_train(tmp_path):
    calls = []
    data_dir = write_tfds_metadata(tmp_path, "caltech101", {"train": 24, "test": 10})
    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir), _recording_reads(calls):
        images = datasets.load_dataset(
            "tfds:caltech101", data_dir=data_dir, image_size=16, streaming="true", seed=1
        )
        assert (images.num_train, images.num_val) == (18, 6)
        assert "last 6 examples" in images.validation and "not stratified" in images.validation
        next(iter(images.train_epochs(6, seed=1)(0)))
        next(iter(images.val_batches(6)))
        pipeline = images.train_epochs(6, seed=1).for_pipeline(tf.distribute.InputContext(2, 1, 2))
        x, y = next(iter(pipeline(0)))
    assert [c[0] for c in calls] == ["train[:18]", "train[18:]", "train[:18]"]
    context = calls[-1][2].input_context
    assert (context.num_input_pipelines, context.input_pipeline_id) == (2, 1)
    assert x.shape == (3, 16, 16, 3) and y.shape == (3,)  # one replica's half of a batch of 6


def test_tfds_epochs_train_on_two_replicas_through_per_replica_input(tmp_path):
    """A TFDS reader per epoch (Python epochs) inside distribute_datasets_from_function."""
    data_dir = write_tfds_metadata(tmp_path, "imagenet2012", {"train": 24, "validation": 8})
    strategy = distribute.make_strategy("mirrored", 2)

    def build():
        model = models.build_model("mlp", input_shape=(8, 8, 3), num_classes=1000, seed=0)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir):
        images = datasets.load_dataset(
            "tfds:imagenet2012", data_dir=data_dir, image_size=8, preprocess="resnet"
        )
        sharded = images.train_epochs(8, seed=0)
        stream = training.train_stream(sharded, strategy, 0, 2, 3)
        assert isinstance(stream, tf.distribute.DistributedDataset)
        result = training.fit(
            build, sharded, epochs=2, steps_per_epoch=3, strategy=strategy, xla=False, verbose=0
        )
    assert result.status == "done" and int(result.model.optimizer.iterations.numpy()) == 6


def test_tfds_streaming_needs_split_sizes(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(ValueError, match=r"TFDS reports no size for the 'train' \(or"):
            datasets.load_dataset("tfds:mnist", data_dir=str(tmp_path), streaming="true")
        in_memory = datasets.load_dataset("tfds:mnist", data_dir=str(tmp_path))
    assert isinstance(in_memory, data.ClassificationData)


def test_streamed_folder_runs_in_the_main_job(image_folder, tmp_path):
    from noisy_keras.run import config as config_lib
    from noisy_keras.run import train as train_lib

    config = config_lib.TrainConfig(
        dataset=f"folder:{image_folder}",
        model="mlp",
        image_size=8,
        streaming="true",
        batch_size=12,
        epochs=2,
        updates_per_epoch=2,
        verbose=0,
    )
    summary = train_lib.train(config, str(tmp_path / "run"))
    assert summary["status"] == "done"
    model = keras.models.load_model(os.path.join(tmp_path, "run", "model.keras"))
    assert int(model.optimizer.iterations) == 4  # 2 epochs x updates_per_epoch
