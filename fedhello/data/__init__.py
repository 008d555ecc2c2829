"""Data sets for federated runs: loaders, held-out splits, model inputs.

``load_labelled_dataset`` gives a ``datasets.Dataset`` with ``text`` or ``image`` plus a
``ClassLabel`` ``label`` column from a built-in offline set (``bbc_news``, ``fashion_mnist``),
local files or a Hub id; ``split_dataset`` holds out test and proxy sets; ``tokenize_text``,
``ImageTransform`` and ``to_tensors`` make model inputs; ``prepare_federated_data`` does all of
it for a run config, partition over clients included.
"""

from .federated import FederatedData, prepare_federated_data
from .sources import (
    BUILTIN_DATASETS,
    FASHION_MNIST_CLASSES,
    label_names,
    load_bbc_news,
    load_fashion_mnist,
    load_labelled_dataset,
    load_local,
    load_text_folder,
)
from .splits import DataSplits, split_dataset, split_indices
from .transforms import ImageTransform, to_tensors, tokenize_text

__all__ = [
    "FederatedData",
    "prepare_federated_data",
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "label_names",
    "load_bbc_news",
    "load_fashion_mnist",
    "load_labelled_dataset",
    "load_local",
    "load_text_folder",
    "DataSplits",
    "split_dataset",
    "split_indices",
    "ImageTransform",
    "to_tensors",
    "tokenize_text",
]
