"""The global model seen from each client: accuracy on held-out data of the client's own label mix.

Under label skew one global accuracy hides the clients the model serves badly. A client's held-out
accuracy is the global model's accuracy on each class of the shared test split, weighted by how
often the class occurs in that client's training data (the test split stands in for held-out data
drawn from the client's own distribution). Causal LMs do the same with per-topic token losses
(``fedhello.nn.lm_eval.mixture_perplexity``); both weight by ``mixture_mean``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fedhello.nn.lm_eval import mixture_mean

__all__ = ["class_accuracy", "client_accuracies", "accuracy_spread"]


def class_accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """``class -> accuracy`` over the test rows of each class present (int ``[n]`` predictions and labels)."""
    return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def client_accuracies(per_class: dict[int, float], client_labels: Sequence[np.ndarray]) -> list[float | None]:
    """Each client's held-out accuracy: ``per_class`` weighted by the client's training labels
    (int ``[n_c]`` each); None for a client none of whose classes is in the test split."""
    out = []
    for labels in client_labels:
        classes, counts = np.unique(np.asarray(labels), return_counts=True)
        value = mixture_mean(per_class, {int(c): float(k) for c, k in zip(classes, counts)})
        out.append(None if math.isnan(value) else value)
    return out


def accuracy_spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """``mean``, ``worst`` (lowest) and ``p10`` (10th percentile, linear interpolation) of the
    clients' accuracies that are known (None where none is)."""
    known = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if known.size == 0:
        return {"mean": None, "worst": None, "p10": None}
    return {"mean": float(known.mean()), "worst": float(known.min()), "p10": float(np.percentile(known, 10))}
