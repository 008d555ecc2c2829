"""Data sets for federated runs: loaders, held-out splits, model inputs.

``load_labelled_dataset`` gives a ``datasets.Dataset`` with ``text`` or ``image`` plus a
``ClassLabel`` ``label`` column from a built-in offline set (``bbc_news``, ``fashion_mnist``),
local files or a Hub id; ``split_dataset`` holds out test and proxy sets; ``tokenize_text``,
``ImageTransform`` and ``to_tensors`` make model inputs; ``prepare_federated_data`` does all of
it for a run config, partition over clients included. Names load on first use, so checking a
config's data-set name (``fedhello.data.sources``) does not import datasets or torch.
"""

from fedhello._lazy import lazy_exports
from fedhello.errors import require_extra

require_extra("fl", "fedhello.data")

_EXPORTS = {
    **dict.fromkeys(["FederatedData", "federate", "federate_clients", "prepare_federated_data"], "federated"),
    **dict.fromkeys(["BUILTIN_DATASETS", "FASHION_MNIST_CLASSES", "check_data_source", "label_names", "standardize",
                     "load_bbc_news", "load_fashion_mnist", "load_labelled_dataset", "load_local",
                     "load_text_folder"], "sources"),
    **dict.fromkeys(["PARTITION_KINDS", "label_counts", "partition_dataset", "partition_labels"], "partition"),
    **dict.fromkeys(["DataSplits", "split_dataset", "split_indices"], "splits"),
    **dict.fromkeys(["IGNORE_INDEX", "instruction_rows", "lm_tensors", "load_lm_dataset", "standardize_lm_dataset",
                     "text_rows"], "lm"),
    **dict.fromkeys(["ImageTransform", "to_tensors", "tokenize_text"], "transforms"),
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
