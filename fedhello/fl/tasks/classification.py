"""Classification runs (``task: classification``): text or images in, a trained head per client.

The global model is judged by test accuracy, loss and macro-F1, and by each client's accuracy
on held-out data of its own label mix (``fedhello.fl.client_eval``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from fedhello.data import FederatedData, ImageTransform, to_tensors, tokenize_text
from fedhello.fl.client_eval import accuracy_spread, class_accuracy, client_accuracies
from fedhello.fl.tasks.base import Batch, RunTask
from fedhello.nn import MultiLoRAModel
from fedhello.seeds import purpose_seed

__all__ = ["ClassificationTask", "evaluate"]


@torch.no_grad()
def evaluate(model: MultiLoRAModel, data: Batch, batch_size: int, slot: int = 0,
             device: torch.device | None = None) -> dict[str, float]:
    """Accuracy, mean cross-entropy, macro-F1 and the accuracy of each class present
    (``class_accuracy``: ``{class: accuracy}``) of bank slot ``slot`` on ``data``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = data["labels"].shape[0]
    preds, loss_sum = [], 0.0
    try:
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
            with model.route(torch.full((batch["labels"].shape[0],), slot, dtype=torch.long)):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    labels = data["labels"].numpy()
    return {
        "accuracy": float((pred == labels).mean()) if n else math.nan,
        "loss": loss_sum / max(n, 1),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)) if n else math.nan,
        "class_accuracy": class_accuracy(pred, labels),
    }


class ClassificationTask(RunTask):
    """Sequence or image classification with a head per client (``head_modules="auto"``)."""

    head_modules = "auto"

    def load_backbone(self, load: Callable[..., nn.Module], data: FederatedData, **base: Any) -> nn.Module:
        images = "image" in data.train.column_names  # ViT-style backbones, pixel_values in
        return load(num_labels=data.num_classes,
                    task="image-classification" if images else "sequence-classification",
                    seed=purpose_seed(self.config.seed, "head"), **base)

    def prepare(self, data: FederatedData, backbone: nn.Module, load_tokenizer: Callable[[], Any]) -> dict[str, Any]:
        """Every client's training tensors, the test tensors and the proxy tensors."""
        if "text" in data.train.column_names:
            tokenizer = load_tokenizer()
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token

            def prepare(ds):
                return to_tensors(tokenize_text(ds, tokenizer, self.config.data.max_length))
        else:
            size = getattr(backbone.config, "image_size", 224)
            transform = ImageTransform(size, num_channels=getattr(backbone.config, "num_channels", 3))

            def prepare(ds):
                return to_tensors(ds, transform=transform)
        train = prepare(data.train)
        clients = [{k: v[torch.as_tensor(idx)] for k, v in train.items()} for idx in data.partitions]
        proxy = prepare(data.proxy) if data.proxy is not None else None
        self.tensors = {"clients": clients, "test": prepare(data.test), "proxy": proxy}
        return self.tensors

    def evaluate(self, model: MultiLoRAModel, device: torch.device) -> dict[str, Any]:
        """``accuracy``, ``loss``, ``macro_f1``, ``client_accuracy`` (each client's accuracy on
        held-out data of its own label mix) and its ``client_accuracy_mean``, ``_worst`` and
        ``_p10`` (10th percentile) over the clients."""
        result = evaluate(model, self.tensors["test"], self.config.engine.eval_batch_size, device=device)
        clients = client_accuracies(result.pop("class_accuracy"),
                                    [c["labels"].numpy() for c in self.tensors["clients"]])
        spread = accuracy_spread(clients)
        return {**result, "client_accuracy": clients, **{f"client_accuracy_{k}": v for k, v in spread.items()}}
