"""Datasets: splits, deterministic epochs, augmentation, TFDS (mocked), image folders."""

import dataclasses
import itertools
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from noisy_keras.data import datasets
from noisy_keras.data import pipeline as data
from noisy_keras.data import tfds as tfds_data
from noisy_keras.data.epochs import epoch_permutation


@pytest.fixture(scope="module")
def digits():
    return datasets.load_dataset("digits", seed=0)


def _batches(dataset, count):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]


def _sorted_rows(x):
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_the_shipped_digits_equal_scikit_learns_copy_in_its_order():
    images, target = datasets.digits_arrays()
    full = load_digits()
    assert (images.dtype, target.dtype, images.shape) == (np.uint8, np.uint8, (1797, 8, 8))
    np.testing.assert_array_equal(images, full.images)
    np.testing.assert_array_equal(target, full.target)


def test_digits_split_is_stratified_3_to_1_and_covers_every_example(digits):
    full = load_digits()
    assert (digits.input_shape, digits.num_classes) == ((8, 8, 1), 10)
    assert digits.num_train + digits.num_val == 1797
    for label in range(10):
        count = int((full.target == label).sum())
        assert (digits.y_val == label).sum() == int(np.floor(0.25 * count + 0.5))
    both = np.concatenate([digits.x_train, digits.x_val]).reshape(-1, 64)
    np.testing.assert_array_equal(
        _sorted_rows(both), _sorted_rows(full.images.reshape(-1, 64) / 16)
    )
    assert digits.x_train.dtype == np.float32 and digits.x_train.max() == 1.0
    assert digits.x_train.min() == 0.0


def test_digits_split_depends_only_on_seed(digits):
    again = datasets.load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.x_val, digits.x_val)
    other = datasets.load_dataset("digits", seed=1, val_fraction=0.5)
    assert other.num_val > 800
    assert not np.array_equal(datasets.load_dataset("digits", seed=1).x_val, digits.x_val)


def test_stratified_split_keeps_one_training_example_per_class():
    train, val = data.stratified_split(np.array([0, 0, 1, 1, 1, 1, 2]), 0.5, seed=3)
    assert sorted(np.concatenate([train, val])) == list(range(7))
    assert list(np.array([0, 0, 1, 1, 1, 1, 2])[val]) == [0, 1, 1]


def test_train_batches_follow_the_epoch_permutation(digits):
    batch_size = 400  # 1346 examples -> 3 full batches per epoch
    assert digits.steps_per_epoch(batch_size) == 3
    batches = _batches(digits.train_batches(batch_size, seed=7), 6)
    for step, (x, y) in enumerate(batches):
        epoch, position = divmod(step, 3)
        order = epoch_permutation(digits.num_train, seed=7, epoch=epoch)
        ids = order[position * batch_size : (position + 1) * batch_size]
        np.testing.assert_array_equal(x, digits.x_train[ids])
        np.testing.assert_array_equal(y, digits.y_train[ids])
    first, second = epoch_permutation(100, 7, 0), epoch_permutation(100, 7, 1)
    assert sorted(first) == list(range(100)) and not np.array_equal(first, second)
    assert not np.array_equal(first, epoch_permutation(100, 8, 0))


def test_train_epochs_gives_one_epoch_of_the_stream_for_int_or_tensor_epochs(digits):
    make_epoch = digits.train_epochs(400, seed=7)
    from_stream = _batches(digits.train_batches(400, seed=7, first_epoch=2), 3)
    for epoch in (2, tf.constant(2, tf.int64)):
        one_epoch = list(make_epoch(epoch).as_numpy_iterator())
        assert len(one_epoch) == 3
        for (x, y), (sx, sy) in zip(one_epoch, from_stream, strict=True):
            np.testing.assert_array_equal(x, sx)
            np.testing.assert_array_equal(y, sy)


def test_batches_per_epoch_keeps_the_first_batches_of_each_epoch(digits):
    batches = _batches(digits.train_batches(100, seed=2, batches_per_epoch=2), 4)
    for step, (_, y) in enumerate(batches):
        epoch, position = divmod(step, 2)
        order = epoch_permutation(digits.num_train, seed=2, epoch=epoch)
        np.testing.assert_array_equal(
            y, digits.y_train[order[position * 100 : (position + 1) * 100]]
        )
    with pytest.raises(ValueError, match=r"at most num_train // batch_size = 13 .* received "):
        digits.train_batches(100, seed=2, batches_per_epoch=14)


def test_train_eval_batches_and_arrays_are_the_training_set_in_order(digits):
    x, y = digits.train_arrays()
    np.testing.assert_array_equal(x, digits.x_train)
    np.testing.assert_array_equal(y, digits.y_train)
    batches = list(digits.train_eval_batches(500).as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [500, 500, 346]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), digits.x_train)


def test_train_batches_have_static_shape(digits):
    spec = digits.train_batches(64, seed=0).element_spec
    assert spec[0].shape == (64, 8, 8, 1) and spec[1].shape == (64,)
    assert (spec[0].dtype, spec[1].dtype) == (tf.float32, tf.int32)


def test_resumed_stream_sees_the_same_batches(digits):
    for augment in (False, True):
        uninterrupted = _batches(digits.train_batches(500, seed=3, augment=augment), 8)
        resumed = _batches(digits.train_batches(500, seed=3, first_epoch=2, augment=augment), 4)
        for (x, y), (x_resumed, y_resumed) in zip(uninterrupted[4:], resumed, strict=True):
            np.testing.assert_array_equal(x, x_resumed)
            np.testing.assert_array_equal(y, y_resumed)


def _is_translation(augmented, original, pad, flips):
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
    height, width = original.shape[:2]
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), flips):
        crop = padded[dy : dy + height, dx : dx + width]
        if np.array_equal(crop[:, ::-1] if flip else crop, augmented):
            return True
    return False


def test_augmentation_translates_without_flipping_digits(digits):
    plain = _batches(digits.train_batches(200, seed=5), 1)[0][0]
    augmented = _batches(digits.train_batches(200, seed=5, augment=True), 1)[0][0]
    assert not np.array_equal(plain, augmented)
    # 8x8 images: pad 1; every augmented image is a shifted copy, never a mirror image.
    assert all(_is_translation(a, p, pad=1, flips=(False,)) for a, p in zip(augmented, plain))


def test_augmentation_flips_when_the_dataset_allows_it(digits):
    flippable = dataclasses.replace(digits, horizontal_flip=True)
    plain = _batches(flippable.train_batches(200, seed=5), 1)[0][0]
    augmented = _batches(flippable.train_batches(200, seed=5, augment=True), 1)[0][0]
    assert all(_is_translation(a, p, pad=1, flips=(False, True)) for a, p in zip(augmented, plain))
    mirrored = [not _is_translation(a, p, pad=1, flips=(False,)) for a, p in zip(augmented, plain)]
    assert 50 < sum(mirrored) < 150  # about half of 200, binomial sd ~7


def test_val_batches_keep_every_example_in_order(digits):
    batches = list(digits.val_batches(100).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [100, 100, 100, 100, 51]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), digits.x_val)
    padded = list(digits.val_batches(100, pad_remainder=True).as_numpy_iterator())
    assert [len(y) for _, y, _ in padded] == [100] * 5
    weights = np.concatenate([w for _, _, w in padded])
    assert weights.sum() == digits.num_val and weights[digits.num_val :].sum() == 0
    np.testing.assert_array_equal(
        np.concatenate([x for x, _, _ in padded])[: digits.num_val], digits.x_val
    )


def test_mnist1d_is_the_package_dataset_and_leaves_global_rng_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)  # noqa: NPY002
    mnist1d = datasets.load_dataset("mnist1d")
    after = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    assert after == np.random.random()  # noqa: NPY002
    assert (mnist1d.num_train, mnist1d.num_val, mnist1d.input_shape) == (4000, 1000, (40, 1))
    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(mnist1d.x_val[:, :, 0], reference["x_test"], rtol=1e-6)
    np.testing.assert_array_equal(mnist1d.y_train, reference["y"])
    assert "test split" in mnist1d.validation
    with pytest.raises(ValueError, match=r"augment=True needs an image dataset; 'mnist1d'"):
        mnist1d.train_batches(32, seed=0, augment=True)


def test_tfds_without_validation_split_is_split_3_to_1(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        mnist = datasets.load_dataset("tfds:mnist", data_dir=str(tmp_path), seed=1)
    assert (mnist.input_shape, mnist.num_classes) == ((28, 28, 1), 10)
    assert mnist.num_train + mnist.num_val == 40
    assert mnist.x_train.dtype == np.uint8 and not mnist.horizontal_flip
    x_all, _ = mnist.train_arrays()
    np.testing.assert_allclose(x_all, mnist.x_train / 255.0, rtol=1e-6)
    x, _ = _batches(mnist.train_batches(8, seed=0), 1)[0]
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    ids = epoch_permutation(mnist.num_train, 0, 0)[:8]
    np.testing.assert_allclose(x, mnist.x_train[ids] / 255.0, rtol=1e-6)


def test_tfds_variable_size_images_are_resized(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        caltech = datasets.load_dataset("tfds:caltech101", data_dir=str(tmp_path), image_size=16)
    assert caltech.input_shape == (16, 16, 3)
    assert caltech.num_classes == 102 and len(caltech.class_names) == 102
    assert caltech.horizontal_flip


def _write_png(path, color, size):
    image = np.broadcast_to(np.array(color, np.uint8), size + (3,))
    tf.io.write_file(str(path), tf.io.encode_png(image))


@pytest.fixture
def image_tree(tmp_path):
    colors = {"cat": (200, 10, 10), "dog": (10, 200, 30), "emu": (0, 0, 255)}
    for index, (name, color) in enumerate(colors.items()):
        (tmp_path / name).mkdir()
        for i in range(4):
            _write_png(tmp_path / name / f"img_{i}.png", color, (10 + i + index, 12))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path, colors


def test_folder_tree_is_decoded_resized_and_split(image_tree):
    root, colors = image_tree
    dataset = datasets.load_dataset(f"folder:{root}", image_size=6, seed=2)
    assert dataset.class_names == ("cat", "dog", "emu")
    assert (dataset.input_shape, dataset.num_classes) == ((6, 6, 3), 3)
    assert (dataset.num_train, dataset.num_val) == (9, 3)
    assert sorted(dataset.y_val) == [0, 1, 2]
    for images, labels in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val)):
        for image, label in zip(images, labels):
            expected = np.array(colors[dataset.class_names[label]], np.uint8)
            np.testing.assert_array_equal(image, np.broadcast_to(expected, (6, 6, 3)))
    ((x, y),) = _batches(dataset.train_batches(4, seed=0, augment=True), 1)
    assert x.shape == (4, 6, 6, 3)


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        datasets.load_dataset(f"folder:{missing}")
    with pytest.raises(ValueError, match=rf"{tmp_path}' has no class subfolders"):
        datasets.load_dataset(f"folder:{tmp_path}")
    (tmp_path / "full").mkdir()
    _write_png(tmp_path / "full" / "a.png", (1, 2, 3), (4, 4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"Class folder '{tmp_path / 'empty'}' has no images"):
        datasets.load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, r"Unknown dataset name='imagenet'; valid names are digits, mnist1d"),
        ({"name": "tfds:"}, r"tfds:NAME .* folder:PATH"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \(0, 1\); received"),
        ({"seed": -1}, r"seed must be an integer >= 0; received seed=-1"),
        ({"image_size": 0}, r"image_size=0"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        datasets.load_dataset(**{"name": "digits", **kwargs})


def test_batch_size_larger_than_the_training_set_raises(digits):
    with pytest.raises(ValueError, match=r"at most the number of training examples \(1346\)"):
        digits.train_batches(5000, seed=0)


def test_tfds_validation_split_is_used_when_present(tmp_path, monkeypatch):
    read_splits = []

    # Mocked TFDS knows no split names; pretend the prepared dataset has these two.
    monkeypatch.setattr(tfds_data, "_tfds_split_names", lambda builder: {"train", "validation"})
    with tfds.testing.mock_data(num_examples=6):
        mocked = tfds.core.DatasetBuilder.as_dataset

        def as_dataset(self, split, **kwargs):
            read_splits.append(split)
            return mocked(self, split=split, **kwargs)

        # Patched inside mock_data only, so TFDS is left exactly as mock_data restores it.
        with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", as_dataset):
            dataset = datasets.load_dataset("tfds:cifar10", data_dir=str(tmp_path))
    assert read_splits == ["train", "validation"]
    assert (dataset.num_train, dataset.num_val) == (6, 6)
    assert dataset.validation == "the dataset's own 'validation' split"
    assert dataset.input_shape == (32, 32, 3)
