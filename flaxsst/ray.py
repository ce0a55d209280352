"""Ray Data batch inference: ``ClassifierPredictor``, the callable class for ``Dataset.map_batches``.

>>> import ray
>>> from flaxsst.ray import ClassifierPredictor
>>> ds = ray.data.read_parquet("reviews/")
>>> ds = ds.map_batches(ClassifierPredictor, fn_constructor_kwargs={"model": "/models/sst2"},
...                     batch_size=1024, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4))
>>> ds.write_parquet("scored/")

Each actor loads the model once (the program store and JAX's compilation cache make a second start on a
machine fast) and answers every batch with the batch's own columns, ids included, plus ``label``,
``score`` and ``error``: a row whose text is missing, empty, not a string or not Unicode gets ``label``
and ``score`` null and the reason in ``error``, and the rest of its batch is scored. The added columns
have one Arrow type in every batch (string, float64, string), so the files a job writes read back as
one table. Ray retries the batches of an actor or node that dies (Ray Data restarts map actors and
retries their tasks by default), so each row is answered once in the output.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

# the columns a predictor adds, in this order; their names can be changed (``label_column=`` ...)
OUTPUT_COLUMNS = ("label", "score", "error")


def cell_error(cell: Any) -> str | None:
    """Why a text cell cannot be classified, or None: missing (None, NaN), empty or blank, not a string,
    not Unicode (a lone surrogate)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return "text is missing"
    if isinstance(cell, (bytes, bytearray)):
        return "text is bytes, expected str"
    if not isinstance(cell, str):
        return f"text is {type(cell).__name__}, expected str"
    if not cell.strip():
        return "text is empty"
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text is not Unicode: a lone surrogate {cell[e.start]!r} at character {e.start}"
    return None


def text_cells(batch: Any, column: str) -> list:
    """The cells of ``column`` of a Ray Data batch (a pyarrow Table, a pandas DataFrame or a dict of numpy
    arrays), as Python values."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch.column(column).to_pylist()
    values = batch[column]
    return list(values.tolist() if hasattr(values, "tolist") else values)


def batch_columns(batch: Any) -> list[str]:
    """The column names of a Ray Data batch."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch.column_names
    if isinstance(batch, Mapping):
        return list(batch)
    return [str(name) for name in batch.columns]


def as_table(batch: Any):
    """A Ray Data batch as a pyarrow Table (``TypeError`` for anything else)."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table({name: column_array(values) for name, values in batch.items()})
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        try:
            return pa.Table.from_pandas(batch, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
            return as_table({str(name): batch[name].to_numpy() for name in batch.columns})
    raise TypeError(f"a batch must be a pyarrow Table, a pandas DataFrame or a dict of arrays, got {type(batch).__name__}")


def column_array(values: Any):
    """One column of a numpy batch as an Arrow array. An object column Arrow cannot type (mixed values, text
    that is not Unicode) becomes strings of its cells, a lone surrogate replaced by U+FFFD: the row keeps its
    place, and its ``error`` says what was wrong."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        return pa.array([None if value is None else unicode_text(value) for value in values], pa.string())


def plain_columns(table):
    """``table`` with each column of Python objects (Ray's type for a column whose cells Arrow cannot type as
    one, as JSON lines mixing numbers and strings give) as strings of its cells: the files a job writes hold
    Arrow's own types, never pickles."""
    import pyarrow as pa

    for index, field in enumerate(table.schema):
        if isinstance(field.type, pa.ExtensionType) and not isinstance(field.type.storage_type, pa.StructType) \
                and "object" in type(field.type).__name__.lower():
            cells = table.column(index).to_pylist()
            table = table.set_column(index, field.name, pa.array(
                [None if cell_error(cell) == "text is missing" else unicode_text(cell) for cell in cells], pa.string()))
    return table


def unicode_text(value: Any) -> str:
    """``str(value)`` with each lone surrogate replaced by U+FFFD."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ClassifierPredictor:
    """Scores the ``text_column`` of each batch with a ``flaxsst.Classifier`` loaded once per actor.

    ``model``: a folder (present on every node) or a hub id. ``all_scores=True`` adds a
    ``score_<LABEL>`` column per label. ``label_column``, ``score_column`` and ``error_column`` name the
    added columns (``ValueError`` where the batch has one already). ``dtype``, ``batch_size``,
    ``max_length`` and ``length_step`` are ``Classifier``'s; ``warm_up=True`` readies every program at
    start (``Classifier.warm_up``) instead of compiling each shape at its first batch; ``hub`` takes
    ``Classifier.from_pretrained``'s hub settings (``revision``, ``cache_dir``, ``local_files_only``).
    """

    def __init__(self, model: str | os.PathLike, text_column: str = "text", *, all_scores: bool = False,
                 label_column: str = "label", score_column: str = "score", error_column: str = "error",
                 dtype: str = "float32", batch_size: int | None = None, max_length: int = 128,
                 length_step: int | None = None, warm_up: bool = False, **hub: Any):
        from flaxsst.classifier import Classifier

        began = time.perf_counter()
        self.classifier = Classifier.from_pretrained(model, dtype=dtype, batch_size=batch_size, max_length=max_length,
                                                     length_step=length_step, key="model", **hub)
        if warm_up:
            self.classifier.warm_up()
        self.text_column = text_column
        self.labels = [self.classifier.config.id2label[i] for i in range(self.classifier.config.num_labels)]
        self.label_column, self.score_column, self.error_column = label_column, score_column, error_column
        self.score_columns = [f"score_{label}" for label in self.labels] if all_scores else []
        self.load_seconds = time.perf_counter() - began

    def added_columns(self) -> list[str]:
        """The columns each answered batch gains, in order."""
        return [self.label_column, self.score_column, *self.score_columns, self.error_column]

    def __call__(self, batch: Any):
        """The batch (any Ray Data batch format) as a pyarrow Table: its columns, then the added ones."""
        import pyarrow as pa

        from flaxsst.metrics import softmax

        check_columns(batch_columns(batch), self.text_column, self.added_columns())
        cells = text_cells(batch, self.text_column)
        table = plain_columns(as_table(batch))
        errors = [cell_error(cell) for cell in cells]
        good = np.array([i for i, error in enumerate(errors) if error is None], dtype=np.int64)
        probs = np.full((len(cells), len(self.labels)), np.nan)
        if len(good):
            logits = self.classifier.logits([cells[i] for i in good], progress=False)
            probs[good] = softmax(logits)
        answered = np.zeros(len(cells), dtype=bool)
        answered[good] = True
        best = np.where(answered, np.nan_to_num(probs).argmax(axis=-1), 0)
        labels = [self.labels[b] if ok else None for b, ok in zip(best, answered)]
        score = np.where(answered, probs[np.arange(len(cells)), best], np.nan)
        added = {self.label_column: pa.array(labels, pa.string()),
                 self.score_column: pa.array(score, pa.float64(), mask=~answered)}
        for index, name in enumerate(self.score_columns):
            added[name] = pa.array(probs[:, index], pa.float64(), mask=~answered)
        added[self.error_column] = pa.array(errors, pa.string())
        for name, array in added.items():
            table = table.append_column(name, array)
        return table


def check_columns(columns: Sequence[str], text_column: str, added: Sequence[str]) -> None:
    """``ValueError`` naming the text column where the data lacks it, or an added column the data has."""
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} is not in the data (its columns: {', '.join(columns)})")
    clash = [name for name in added if name in columns]
    if clash:
        raise ValueError(f"column {clash[0]!r} is in the data already: give the prediction's column another name")
