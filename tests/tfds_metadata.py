"""TFDS metadata with split sizes, for `tfds.testing.mock_data(data_dir=...)`.

Mocked TFDS knows no split sizes unless it finds a prepared dataset's
`dataset_info.json`; this writes one (no records), so the code under test sees
the splits and example counts a prepared dataset would report.
"""

import os

import tensorflow_datasets as tfds


def write_tfds_metadata(data_dir, name: str, splits: dict[str, int]) -> str:
    """Writes DATA_DIR/NAME/VERSION/dataset_info.json with `splits` {split: examples}."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0, filename_template=None)
        for split, count in splits.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return str(data_dir)
