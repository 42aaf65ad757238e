"""The data sets by name, their preprocessing and streaming choices, without TensorFlow.

`data.datasets` loads each name; `run.config` validates `--dataset`,
`--preprocess` and `--streaming` against these.
"""

DATASET_NAMES = ("digits", "mnist1d")
DATASET_PREFIXES = ("tfds:", "folder:")  # tfds:NAME, folder:PATH
PREPROCESSING_NAMES = ("resize", "resnet")
STREAMING_CHOICES = ("auto", "true", "false")

__all__ = ["DATASET_NAMES", "DATASET_PREFIXES", "PREPROCESSING_NAMES", "STREAMING_CHOICES"]
