"""Loaders: the real offline BBC News and Fashion-MNIST sets, local files and folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedhello.data import FASHION_MNIST_CLASSES, label_names, load_labelled_dataset, load_local
from fedhello.data.sources import FASHION_MNIST_ROOT, load_fashion_mnist

HAS_FASHION_MNIST = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def bbc():
    return load_labelled_dataset("bbc_news")


def test_bbc_news_has_2225_docs_in_5_sorted_classes(bbc):
    assert len(bbc) == 2225 and bbc.column_names == ["text", "label"]
    assert label_names(bbc) == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(bbc["label"]).tolist() == [510, 386, 417, 511, 401]
    # Folders in sorted order, files in sorted order: business/001.txt comes first.
    assert bbc[0]["text"].startswith("Ad sales boost Time Warner profit") and bbc[0]["label"] == 0
    # sports/199.txt is Windows-1252 (a bare 0xA3): decoded, not dropped.
    assert any("£15.8m signing" in t for t in bbc.select(range(1313, 1824))["text"])


def test_bbc_news_single_split():
    with pytest.raises(ValueError, match="^split"):
        load_labelled_dataset("bbc_news", split="test")


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="needs `apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_from_idx_files():
    train = load_fashion_mnist("train")
    test = load_labelled_dataset("fashion_mnist", split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert label_names(train) == list(FASHION_MNIST_CLASSES)
    assert np.bincount(train["label"]).tolist() == [6000] * 10
    first = np.asarray(train.with_format("numpy")[0]["image"])
    assert first.shape == (28, 28) and train[0]["label"] == 9  # the first image is an ankle boot
    assert 0 <= first.min() and first.max() <= 255 and first.sum() > 0


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="^split"):
        load_fashion_mnist("validation")


def test_local_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("id,review,sentiment\n1,great film,pos\n2,dull,neg\n3,fine,pos\n4,awful,neg\n5,meh,neutral\n")
    ds = load_labelled_dataset(path=path, label_column="sentiment")
    assert ds.column_names == ["text", "label"]
    assert label_names(ds) == ["neg", "neutral", "pos"]
    assert ds["label"] == [2, 0, 2, 0, 1]
    assert ds["text"] == ["great film", "dull", "fine", "awful", "meh"]


def test_local_jsonl_with_int_labels(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", 3), ("b", 1), ("c", 3)]))
    ds = load_local(path)
    assert label_names(ds) == ["1", "3"] and ds["label"] == [1, 0, 1]


def test_local_folders_of_images_and_texts(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((5, 4), value, dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
        (tmp_path / "txt" / cls).mkdir(parents=True)
        (tmp_path / "txt" / cls / "a.txt").write_text(f"about a {cls}")
    images = load_labelled_dataset(path=tmp_path / "img")
    assert images.column_names == ["image", "label"] and label_names(images) == ["cat", "dog"]
    assert sorted(images["label"]) == [0, 0, 1, 1]
    row = images[0]
    assert np.asarray(row["image"]).max() == (10 if row["label"] == 0 else 200)
    texts = load_labelled_dataset(path=tmp_path / "txt")
    assert texts["text"] == ["about a cat", "about a dog"] and texts["label"] == [0, 1]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="^path"):
        load_labelled_dataset(path=tmp_path / "none.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="^path: unsupported file type"):
        load_labelled_dataset(path=tmp_path / "x.xlsx")
    with pytest.raises(ValueError, match="^name"):
        load_labelled_dataset()
    with pytest.raises(ValueError, match="^path"):
        load_labelled_dataset("user/some-set", path=tmp_path)
    csv = tmp_path / "nolabel.csv"
    csv.write_text("text,y\na,1\n")
    with pytest.raises(ValueError, match="^label_column"):
        load_local(csv)


def test_local_csv_with_missing_labels_names_the_rows(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngood,pos\nbad,\nfine,pos\n")
    with pytest.raises(ValueError, match=r"^label_column: 1 of 3 rows have no 'label' value \(first: row 1\)"):
        load_local(path)
