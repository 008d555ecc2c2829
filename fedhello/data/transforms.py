"""Model inputs from standardised data sets: tokenization, image preprocessing, tensors.

* ``tokenize_text``: ``text`` → ``input_ids``/``attention_mask`` with a Hugging Face tokenizer,
  truncated and padded to ``max_length`` (fixed shapes make client batches concatenable).
* ``ImageTransform``: ``image`` (PIL images or uint8 arrays) → ``pixel_values`` float32
  ``[n, C, size, size]``, resized and normalised, grey scale replicated to C channels.
* ``to_tensors``: the rows of a data set (optionally a subset) as a dict of tensors, with the
  label column renamed ``labels`` as ``transformers`` models expect.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["tokenize_text", "ImageTransform", "to_tensors"]


def tokenize_text(dataset: datasets.Dataset, tokenizer: Any, max_length: int, *, text_column: str = "text",
                  batch_size: int = 1000) -> datasets.Dataset:
    """Tokenize ``text_column`` into fixed-length ``input_ids`` and ``attention_mask``.

    Args:
        dataset: a data set with ``text_column`` and ``label``.
        tokenizer: a Hugging Face tokenizer (called with truncation and ``padding="max_length"``).
        max_length: tokens per example (>= 1).

    Returns:
        columns ``input_ids``, ``attention_mask`` (int lists of length ``max_length``) and the
        data set's other columns but ``text_column``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column: {text_column!r} is not a column of the data set {dataset.column_names}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        out = tokenizer(batch[text_column], truncation=True, max_length=max_length, padding="max_length")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    # A second of work: no progress bar of its own in the middle of a run's output.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=[text_column])
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


class ImageTransform:
    """Batch image preprocessing to ``pixel_values``.

    Args:
        size: output height and width.
        mean, std: per-channel normalisation of [0, 1] intensities (one value per output channel).
        num_channels: output channels (3 for ImageNet backbones; grey images are replicated).
        image_column, label_column: input columns.
    """

    def __init__(self, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 num_channels: int = 3, image_column: str = "image", label_column: str = "label") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels: expected 1 or 3, got {num_channels!r}")
        if len(mean) != num_channels or len(std) != num_channels or min(std) <= 0:
            raise ValueError(f"mean/std: expected {num_channels} values each (std > 0), got {list(mean)}, {list(std)}")
        self.size, self.num_channels = size, num_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_column, self.label_column = image_column, label_column

    def _one(self, image: Any) -> torch.Tensor:
        arr = np.asarray(image)
        scale = 255.0 if arr.dtype == np.uint8 or arr.max(initial=0) > 1 else 1.0
        t = torch.as_tensor(arr, dtype=torch.float32) / scale
        if t.dim() == 2:
            t = t.unsqueeze(0)
        elif t.dim() == 3:
            t = t.permute(2, 0, 1)[:3]  # HWC → CHW, alpha dropped
        else:
            raise ValueError(f"image: expected an H x W or H x W x C image, got shape {tuple(arr.shape)}")
        if t.shape[0] != self.num_channels:
            t = t.mean(0, keepdim=True).expand(self.num_channels, -1, -1)
        t = F.interpolate(t.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True).squeeze(0)
        return (t - self.mean) / self.std

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": float32 [n, C, size, size], "labels": int64 [n]}`` of a column batch."""
        images = batch[self.image_column]
        pixels = torch.stack([self._one(im) for im in images]) if len(images) else \
            torch.empty(0, self.num_channels, self.size, self.size)
        return {"pixel_values": pixels, "labels": torch.as_tensor(np.asarray(batch[self.label_column]),
                                                                  dtype=torch.int64)}


def to_tensors(dataset: datasets.Dataset, indices: Sequence[int] | np.ndarray | None = None, *,
               transform: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]] | None = None,
               label_column: str = "label") -> dict[str, torch.Tensor]:
    """Rows of ``dataset`` (all, or ``indices``) as tensors with a common leading dimension.

    Without ``transform`` every numeric column becomes a tensor (e.g. ``input_ids [n, S]``,
    ``attention_mask [n, S]``) and ``label_column`` becomes ``labels`` (int64 ``[n]``); raw
    ``text``/``image`` columns are not allowed then. With ``transform`` (e.g. an
    ``ImageTransform``) the selected rows are handed to it as one column batch.
    """
    rows = dataset if indices is None else dataset.select(np.asarray(indices, dtype=np.int64))
    if transform is not None:
        return transform(rows.with_format("numpy")[:])
    raw = [c for c in ("text", "image") if c in rows.column_names]
    if raw:
        raise ValueError(f"transform: column {raw[0]!r} needs a transform (tokenize_text first for text, "
                         f"ImageTransform for images)")
    out = dict(rows.with_format("torch")[:])
    if label_column in out:
        out["labels"] = out.pop(label_column).to(torch.int64)
    return out
