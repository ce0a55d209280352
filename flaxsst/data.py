"""SST-2 (or any text/label table) -> tokenized examples -> numpy batches. No jax here.

Sources (``data.path``): the GLUE SST-2 hub dataset (``glue/sst2``, through
``datasets``); a local GLUE folder (``train.tsv``/``dev.tsv``/``test.tsv`` as
``download_glue_data.py`` lays it out); a csv/tsv/json/jsonl/parquet file given as
the split; or ``synthetic``, a generated sentiment task for tiny runs.

Each epoch is a seeded permutation of the whole train set cut into global batches;
the last, partial batch is kept and its padding rows carry weight 0.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from flaxsst.config import DataSection
from flaxsst.errors import DataError
from flaxsst.hub import load_dataset_split, looks_like_path
from flaxsst.paths import read_text
from flaxsst.tokenizer import pad_right

GLUE_FILES = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclasses.dataclass
class TokenizedSplit:
    """Ragged token ids (``[CLS] ... [SEP]``) and integer labels of one split."""

    name: str
    source: str
    token_ids: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# ---- synthetic task ----------------------------------------------------------------------

SYNTHETIC_POSITIVE = "good great fine amazing wonderful best love charming funny brilliant".split()
SYNTHETIC_NEGATIVE = "bad awful boring dull terrible worst hate bleak sad tedious".split()
SYNTHETIC_NEUTRAL = "the a film movie story was it this and of day series very plot actors is".split()


def synthetic_vocab(path: Path) -> Path:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + SYNTHETIC_NEUTRAL + SYNTHETIC_POSITIVE + SYNTHETIC_NEGATIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


def synthetic_sentiment(size: int, seed: int) -> tuple[list[str], list[int]]:
    """Sentences of neutral filler with 1-3 sentiment words; the label is their majority."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(size):
        label = int(rng.integers(0, 2))
        n_cues = int(rng.choice([1, 3]))
        n_major = n_cues if n_cues == 1 else int(rng.integers(2, 4))
        major, minor = (SYNTHETIC_POSITIVE, SYNTHETIC_NEGATIVE) if label else (SYNTHETIC_NEGATIVE, SYNTHETIC_POSITIVE)
        words = list(rng.choice(SYNTHETIC_NEUTRAL, size=int(rng.integers(3, 12))))
        cues = list(rng.choice(major, size=n_major)) + list(rng.choice(minor, size=n_cues - n_major))
        for cue in cues:
            words.insert(int(rng.integers(0, len(words) + 1)), cue)
        texts.append(" ".join(words) + " .")
        labels.append(label)
    return texts, labels


# ---- reading -----------------------------------------------------------------------------

def _check_text_file(path: Path, header: bool) -> None:
    """An empty file, a table with a header and no rows, or one that is not UTF-8 (named with the line
    of the first bad byte)."""
    text = read_text(path, error=DataError)
    if not text.strip():
        raise DataError(f"{path} is empty: expected a header line and one row per example")
    if header and not any(line.strip() for line in text.splitlines()[1:]):
        raise DataError(f"{path} has a header but no rows")


def _load_file(path: Path):
    """-> (rows as a ``datasets.Dataset``, the first data line number, or None where rows are not lines)."""
    import datasets

    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}")
    kwargs = {}
    if builder == "csv":
        kwargs = dict(delimiter="\t" if path.suffix == ".tsv" else ",", keep_default_na=False)
        if path.suffix == ".tsv":
            kwargs["quoting"] = csv.QUOTE_NONE  # GLUE sentences contain bare quotes
    if builder != "parquet":
        _check_text_file(path, header=builder == "csv")
    try:
        table = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as e:  # the file's own problem (a malformed row, a broken parquet file)
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as {builder}: {type(cause).__name__}: "
                        f"{(str(cause).strip().splitlines() or [''])[0][:300]}") from None
    if len(table) == 0:
        raise DataError(f"{path} has a header but no rows")
    return table, (2 if builder == "csv" else 1) if builder != "parquet" else None


def _split_file(data: DataSection, split: str) -> Path | None:
    """The local file that holds ``split``: the split named as a file, the folder's file for it, or
    ``data.path`` itself where it is a file; None for a hub data set."""
    folder = Path(data.path).expanduser()
    split_path = Path(split).expanduser()
    if split_path.is_file():
        return split_path
    if "/" in split or split.startswith("~") or split_path.suffix in FILE_BUILDERS:  # a file was meant
        key = "data.eval_split" if split == data.eval_split else "data.train_split"
        raise DataError(f"{key}={split}: {split_path} does not exist")
    if folder.is_dir():
        stem = GLUE_FILES.get(split, split)
        candidates = [folder / f"{stem}{ext}" for ext in FILE_BUILDERS]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(f"{folder} has no file for split {split!r}: looked for {[c.name for c in candidates]}")
        return found[0]
    if folder.is_file():
        return folder
    if looks_like_path(data.path):
        raise DataError(f"data.path={data.path}: {folder} does not exist")
    return None


def check_distinct_splits(data: DataSection) -> None:
    """Training and evaluating on the same file reports the accuracy of memorised rows: refused."""
    if data.path == "synthetic":
        return
    train, evaluation = _split_file(data, data.train_split), _split_file(data, data.eval_split)
    if train is None or evaluation is None or train.resolve() != evaluation.resolve():
        return
    if Path(data.path).expanduser().is_file():
        raise DataError(f"data.path={data.path} is one file, which would be both the train and the eval split; "
                        "name the eval file with data.eval_split=PATH, or point data.path at a folder "
                        "with train.tsv and dev.tsv")
    raise DataError(f"data.train_split={data.train_split} and data.eval_split={data.eval_split} both read {train}; "
                    "evaluating on the training rows overstates accuracy: name another eval split or file")


def _load_table(data: DataSection, split: str):
    """-> (rows as a ``datasets.Dataset``, a description for errors, first data line number or None)."""
    import datasets

    datasets.disable_progress_bars()
    path = _split_file(data, split)
    if path is not None:
        table, first_line = _load_file(path)
        return table, str(path), first_line
    return load_dataset_split(data.path, split), f"{data.path} [{split}]", None


def _label_id(value, label2id: dict[str, int], num_labels: int) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value in label2id:
            return label2id[value]
        if not value.lstrip("-").isdigit():
            return None
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and 0 <= value < num_labels:
        return int(value)
    return None


def _looks_unlabelled(column: str) -> bool:
    """Whether a column is a row number or id (GLUE's ``index``, ``idx``), not a label."""
    return column.lower() in ("index", "idx", "id", "")


def read_split(data: DataSection, split: str, label2id: dict[str, int], seed: int = 0) -> tuple[list[str], np.ndarray, str]:
    """``(texts, labels, source)``; a bad row raises ``DataError`` naming the file and the row."""
    if data.path == "synthetic":
        if len(label2id) < 2:
            raise DataError(f"data.path=synthetic has 2 classes (0 negative, 1 positive); the model has "
                            f"{len(label2id)} label {sorted(label2id)}: set model.labels to two names")
        size = data.synthetic_train_size if split == "train" else data.synthetic_eval_size
        texts, labels = synthetic_sentiment(size, seed + (0 if split == "train" else 1))
        return texts, np.asarray(labels, dtype=np.int32), f"synthetic [{split}]"
    table, source, first_line = _load_table(data, split)
    if data.text_column not in table.column_names:
        raise DataError(f"{source}: no column {data.text_column!r}; columns are {table.column_names} "
                        "(set data.text_column=<one of them>)")
    if data.label_column not in table.column_names:
        others = [c for c in table.column_names if c != data.text_column]
        if all(_looks_unlabelled(c) for c in others):  # GLUE's test.tsv: index and sentence, no labels
            raise DataError(f"{source} has no labels: no column {data.label_column!r}, only {table.column_names} "
                            "(GLUE's test split is unlabelled); evaluate on a labelled split, e.g. "
                            "data.eval_split=validation")
        raise DataError(f"{source}: no column {data.label_column!r}; columns are {table.column_names} "
                        f"(set data.label_column=<one of {others}>)")
    texts, labels = table[data.text_column], table[data.label_column]
    out = np.empty(len(labels), dtype=np.int32)
    for row, (text, label) in enumerate(zip(texts, labels)):
        where = f"{source}: row {row + 1}" + (f" (line {row + first_line})" if first_line else "")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing text in column {data.text_column!r} (got {text!r})")
        label_id = _label_id(label, label2id, len(label2id))
        if label_id is None:
            raise DataError(
                f"{where}: label {label!r} is not one of the model's labels {sorted(label2id.values())} / {sorted(label2id)}"
            )
        out[row] = label_id
    return list(texts), out, source


def load_tokenized(data: DataSection, split: str, tokenizer, label2id: dict[str, int], cache_dir: Path, seed: int = 0) -> TokenizedSplit:
    """Read, check and tokenize a split once; later runs read the cached ids."""
    texts, labels, source = read_split(data, split, label2id, seed)
    key = hashlib.sha256()
    key.update(tokenizer.backend.to_str().encode())
    key.update(str(data.max_seq_length).encode())
    key.update(labels.tobytes())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    cache = Path(cache_dir) / f"tokens-{key.hexdigest()[:20]}.npz"
    if cache.is_file():
        stored = np.load(cache)
        flat, offsets = stored["flat"], stored["offsets"]
    else:
        ids = tokenizer.encode(texts)
        offsets = np.cumsum([0] + [len(seq) for seq in ids]).astype(np.int64)
        flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int32, count=int(offsets[-1]))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, flat=flat, offsets=offsets)
        os.replace(tmp, cache)
    token_ids = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return TokenizedSplit(split, source, token_ids, labels)


# ---- batching ------------------------------------------------------------------------------

def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Batches per epoch, the last partial one included (HF Trainer's count)."""
    return math.ceil(num_examples / global_batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batch_indices(step: int, num_examples: int, global_batch_size: int, seed: int) -> np.ndarray:
    """Example indices of global step ``step`` (0-based): a pure function of the step."""
    per_epoch = steps_per_epoch(num_examples, global_batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_permutation(num_examples, seed, epoch)
    return order[position * global_batch_size : (position + 1) * global_batch_size]


def pick_length(longest: int, buckets: Sequence[int], max_seq_length: int) -> int:
    for bucket in sorted(buckets):
        if longest <= bucket:
            return bucket
    return max_seq_length


def batch_length(split: TokenizedSplit, indices: np.ndarray, buckets: Sequence[int], max_seq_length: int) -> int:
    """The padded length of the batch of ``indices``: the smallest bucket its longest example fits."""
    return pick_length(max((len(split.token_ids[i]) for i in indices), default=2), buckets, max_seq_length)


def make_batch(split: TokenizedSplit, indices: np.ndarray, rows: int, buckets: Sequence[int],
               max_seq_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """``rows`` rows: the examples at ``indices`` then padding rows of weight 0.

    -> ``input_ids, attention_mask [rows, length]`` int32, ``labels [rows]`` int32,
    ``weights [rows]`` float32; ``length`` is the smallest bucket that fits (``batch_length``).
    """
    seqs = [split.token_ids[i] for i in indices]
    length = batch_length(split, indices, buckets, max_seq_length)
    input_ids, mask = pad_right(seqs, rows, length, pad_id)
    labels = np.zeros(rows, dtype=np.int32)
    labels[: len(indices)] = split.labels[indices]
    weights = np.zeros(rows, dtype=np.float32)
    weights[: len(indices)] = 1.0
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weights": weights}


def process_slice(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch (its rows divide evenly: the trainer checks)."""
    per_process = len(batch["labels"]) // process_count
    return {k: v[process_index * per_process : (process_index + 1) * per_process] for k, v in batch.items()}


def eval_index_batches(num_examples: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index blocks covering every example exactly once."""
    for start in range(0, num_examples, batch_size):
        yield np.arange(start, min(start + batch_size, num_examples))


def train_lengths(split: TokenizedSplit, steps: range, global_batch_size: int, seed: int, buckets: Sequence[int],
                  max_seq_length: int) -> list[int]:
    """The padded lengths the train batches of ``steps`` take, so a run compiles just those programs."""
    return sorted({batch_length(split, train_batch_indices(step, len(split), global_batch_size, seed), buckets,
                                max_seq_length) for step in steps})


def eval_lengths(split: TokenizedSplit, rows: int, buckets: Sequence[int], max_seq_length: int) -> list[int]:
    """The padded lengths the eval batches of ``rows`` rows take."""
    return sorted({batch_length(split, indices, buckets, max_seq_length)
                   for indices in eval_index_batches(len(split), rows)})
