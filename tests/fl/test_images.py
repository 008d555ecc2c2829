"""An image classification run end to end: a local ViT checkpoint whose head has another number of
classes, images from a local folder of class sub-folders (what fashion_mnist runs also take)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from fedhello.config import RunConfig
from fedhello.fl.server import FederatedRun
from fedhello.models import load_backbone

from tests.nn.tiny import make_model


@pytest.fixture
def vit_folder(tmp_path):
    folder = tmp_path / "vit"
    make_model("vit").save_pretrained(str(folder))  # a head of tests.nn.tiny.LABELS classes
    return folder


def test_a_head_of_another_size_is_replaced(vit_folder):
    model = load_backbone(vit_folder, task="image-classification", num_labels=2, seed=0)
    assert model.classifier.out_features == 2


def test_image_run_loads_an_image_backbone_and_trains(vit_folder, tmp_path):
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    config = RunConfig.from_dict({
        "seed": 1, "model": {"name": str(vit_folder), "rank": 2, "alpha": 4},
        "data": {"name": None, "path": str(tmp_path / "images"), "num_clients": 2, "test_fraction": 0.25},
        "rounds": 1, "cohort_size": 2, "local": {"steps": 1, "batch_size": 4}, "output_dir": str(tmp_path / "run"),
    })
    run = FederatedRun(config, progress=False)
    assert type(run.model.backbone).__name__ == "ViTForImageClassification"
    (record,) = run.run()
    assert math.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1
