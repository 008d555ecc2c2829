"""Up-front checks of model and data-set names (``check_backbone_name``, ``check_data_source``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from fedhello import hub
from fedhello.config import DataConfig
from fedhello.data.sources import BUILTIN_DATASETS, check_data_source
from fedhello.errors import UserError
from fedhello.models import loading
from fedhello.models.loading import check_backbone_name, offline_aliases


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_local_model_folder_needs_config_json(tmp_path):
    with pytest.raises(UserError, match=r"^model\.name: the folder .* has no config\.json"):
        check_backbone_name(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_backbone_name(str(tmp_path))


def test_aliases_are_read_from_the_loader_table(monkeypatch, offline):
    monkeypatch.setitem(loading._ALIASES, "tiny-test-alias", (lambda: None, False))
    assert "tiny-test-alias" in offline_aliases()
    check_backbone_name("Tiny-Test-Alias")  # case-insensitive, no hub needed
    with pytest.raises(UserError, match="tiny-test-alias") as info:
        check_backbone_name("org/unknown-model")
    assert str(info.value).startswith("model.name: 'org/unknown-model'") and "HF_HUB_OFFLINE" in str(info.value)


def test_a_cached_hub_id_passes_offline(monkeypatch, tmp_path, offline):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError):
        check_backbone_name("org/cached-model")
    (tmp_path / "models--org--cached-model" / "snapshots" / "abc").mkdir(parents=True)
    check_backbone_name("org/cached-model")


def test_not_a_name_at_all():
    with pytest.raises(UserError, match=r"^model\.name: 'a b' is not a model folder"):
        check_backbone_name("a b")
    with pytest.raises(UserError, match=r"^data\.name: 'a b' is neither a built-in data set"):
        check_data_source(DataConfig(name="a b"))


def test_online_hub_that_lacks_the_repo(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_offline_reason", lambda datasets=False: None)
    monkeypatch.setattr(hub, "hub_lacks", lambda repo_id, repo_type: repo_id.endswith("missing"))
    check_backbone_name("org/present")
    with pytest.raises(UserError, match=r"^model\.name: 'org/missing' .* the Hugging Face hub has no model"):
        check_backbone_name("org/missing")
    with pytest.raises(UserError, match=r"^data\.name: 'missing' .* the Hugging Face hub has no dataset"):
        check_data_source(DataConfig(name="missing"))


def test_builtin_data_sets_check_their_splits_and_files(tmp_path):
    assert set(BUILTIN_DATASETS) == {"bbc_news", "bbc_headlines", "fashion_mnist"}
    with pytest.raises(UserError, match=r"^data\.split: bbc_news has the splits \('train',\), got 'test'"):
        check_data_source(DataConfig(name="bbc_news", split="test"))
    with pytest.raises(UserError, match=r"^data\.test_split: bbc_headlines has the splits \('train',\)"):
        check_data_source(DataConfig(name="bbc_headlines", test_split="test"))
    with pytest.raises(UserError, match=r"^data\.test_split: fashion_mnist"):
        check_data_source(DataConfig(name="fashion_mnist", path=str(tmp_path), test_split="validation"))
    with pytest.raises(UserError, match=r"^data\.name: fashion_mnist: 4 of its IDX files"):
        check_data_source(DataConfig(name="fashion_mnist", path=str(tmp_path)))
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").write_bytes(b"")
    check_data_source(DataConfig(name="fashion_mnist", path=str(tmp_path), test_split="test"))


@pytest.mark.parametrize("suffix, content", [(".csv", "text,y\nhi,1\n"), (".tsv", "text\ty\nhi\t1\n"),
                                             (".jsonl", '{"text": "hi", "y": 1}\n')])
def test_local_file_columns_are_checked_from_the_header(tmp_path, suffix, content):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=r"^data\.label_column: no 'label' or 'labels' column .*columns: text, y"):
        check_data_source(DataConfig(path=str(path)))
    with pytest.raises(UserError, match=r"^data\.text_column: 'body' is not a column"):
        check_data_source(DataConfig(path=str(path), label_column="y", text_column="body"))
    check_data_source(DataConfig(path=str(path), label_column="y"))


def test_unreachable_hub_is_one_probe_without_retries(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub._probe.cache_clear()
    reason = hub.hub_offline_reason()
    assert reason is not None and "unreachable" in reason and "127.0.0.1:9" in reason
    assert hub._probe.cache_info().misses == 1
    hub.hub_offline_reason()
    assert hub._probe.cache_info().misses == 1  # asked once per process


@pytest.mark.parametrize("name, expected", [("bert-base-uncased", True), ("org/name.v2", True), ("a/b/c", False),
                                            ("/abs/path", False), ("../x", False), ("", False)])
def test_looks_like_hub_id(name, expected):
    assert hub.looks_like_hub_id(name) is expected


def test_a_folder_without_class_sub_folders(tmp_path):
    with pytest.raises(UserError, match=r"^data\.path: .* holds no <class>/ sub-folders"):
        check_data_source(DataConfig(path=str(tmp_path)))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("hello")
    check_data_source(DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize("override, field", [
    ("tiers.fractions=[0.5, 2]", "tiers.fractions"), ("tiers.shares=[1]", "tiers.shares"),
    ("strategy.options.nope=1", "strategy.options.nope"), ("strategy.options.warmup=-1", "strategy.options.warmup"),
    ("data.partition.alpha=0", "data.partition.alpha"), ("data.partition=3", "data.partition"),
    ("data.partition.nope=1", "data.partition.nope"), ("local.optimizer=x", "local.optimizer"),
    ("model.target_modules=[]", "model.target_modules"), ("data.max_samples=3", "data.max_samples"),
    ("rounds=1.5", "rounds"), ("engine.device=''", "engine.device"),
])
def test_every_config_error_starts_with_the_dotted_field(override, field):
    from fedhello.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [override])
    assert str(info.value).startswith(f"{field}: ")
