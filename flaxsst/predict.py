"""``Classifier``: texts in, Hugging Face pipeline-style predictions out.

>>> clf = Classifier.from_pretrained("distilbert-base-uncased-finetuned-sst-2-english")
>>> clf(["Today was an amazing day!"])
[{'label': 'POSITIVE', 'score': 0.9998...}]

Inputs are sorted by length, cut into batches, and each batch is padded to the
smallest of a few lengths (powers of two up to ``max_length``) and a power-of-two
row count, so repeated calls reuse a handful of compiled programs. Results come
back in input order.

Command line: ``python -m flaxsst.predict --model DIR_OR_HUB_ID`` reads JSON
``{"input_data": [...]}``, a JSON list of texts, or one text per line on stdin and prints the JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxsst import cli
from flaxsst.config import ModelConfig
from flaxsst.data import pick_length
from flaxsst.errors import ConfigError, DataError, not_utf8
from flaxsst.metrics import softmax
from flaxsst.model import DistilBertForSequenceClassification, Precision
from flaxsst.runtime import enable_compilation_cache
from flaxsst.tokenizer import Tokenizer, pad_right


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``max_length``, and ``max_length`` itself."""
    buckets = []
    length = smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    buckets.append(max_length)
    return tuple(buckets)


def validate_texts(texts: Any) -> list[str]:
    """A string is a list of one; every item must be a string (``TypeError`` names the first that is
    not) of Unicode text (``ValueError`` names the first holding a lone surrogate, as text decoded
    with ``errors="surrogateescape"`` or JSON's ``"\\ud800"`` does)."""
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError(f"expected a string or a list of strings, got {type(texts).__name__}: decode it to str first")
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or not hasattr(texts, "__iter__"):
        raise TypeError(f"expected a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"input {index} is {type(text).__name__}, expected str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"input {index} is not Unicode text: a lone surrogate {text[e.start]!r} at character "
                             f"{e.start} (bytes that were not UTF-8?)") from None
    return texts


class Classifier:
    """Sequence classification with a flaxsst DistilBERT.

    ``clf(texts)`` -> ``[{"label": ..., "score": ...}, ...]``; ``clf.logits(texts)`` ->
    float32 ``[n, num_labels]``. ``dtype`` is the compute dtype; ``model`` replaces the flax module
    applied to the parameters (default: ``DistilBertForSequenceClassification`` in ``dtype``).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 128,
        max_length: int = 128,
        dtype: Any = jnp.float32,
        model: nn.Module | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ConfigError(f"max_length={max_length} must lie in [2, {config.max_position_embeddings}] "
                              "(the model's max_position_embeddings)")
        enable_compilation_cache()
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = Tokenizer(tokenizer.backend, max_length, tokenizer.lowercase)
        self.batch_size = batch_size
        self.max_length = max_length
        self.buckets = length_buckets(max_length)
        self.model = model or DistilBertForSequenceClassification(config, Precision(dtype))
        self.forward = jax.jit(lambda p, ids, mask: self.model.apply({"params": p}, ids, mask, deterministic=True))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = jnp.float32,
        batch_size: int = 128,
        max_length: int = 128,
        **hub_kwargs: Any,
    ) -> "Classifier":
        """From a HF folder or hub id holding weights, ``config.json`` and tokenizer files (``hub_kwargs``:
        ``revision``, ``cache_dir``, ``local_files_only``, and ``key``, the setting named in errors)."""
        from flaxsst.convert import load_pretrained
        from flaxsst.hub import resolve_model_dir

        folder = resolve_model_dir(name_or_path, **hub_kwargs)
        config, params = load_pretrained(folder)
        tokenizer = Tokenizer.from_pretrained(folder, max_length)
        return cls(config, params, tokenizer, batch_size=batch_size, max_length=max_length, dtype=dtype)

    def _row_count(self, n: int) -> int:
        rows = 1
        while rows < n:
            rows *= 2
        return min(rows, self.batch_size)

    def logits(self, texts: Sequence[str] | str, progress: bool | None = None) -> np.ndarray:
        """float32 logits ``[len(texts), num_labels]``, in input order.

        ``progress``: a tqdm bar over batches; ``None`` shows one for long inputs on a terminal.
        """
        texts = validate_texts(texts)
        out = np.zeros((len(texts), self.config.num_labels), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer.encode(texts)
        order = np.argsort([len(seq) for seq in ids], kind="stable")
        starts = range(0, len(order), self.batch_size)
        if progress is None:
            disable = None if len(starts) > 20 else True  # None: tqdm shows the bar only on a terminal
        else:
            disable = not progress
        batches = starts if disable is True else tqdm(starts, desc="predict", unit="batch", disable=disable)
        pending = []
        for start in batches:
            chunk = order[start : start + self.batch_size]
            length = pick_length(max(len(ids[i]) for i in chunk), self.buckets, self.max_length)
            pending.append((chunk, self.forward_batch([ids[i] for i in chunk], self._row_count(len(chunk)), length)))
        for chunk, logits in pending:
            out[chunk] = np.asarray(logits)[: len(chunk)]
        return out

    def forward_batch(self, ids: list[list[int]], rows: int, length: int) -> jax.Array:
        """The one place a batch goes to the device: token ids padded to ``rows`` x ``length`` ->
        logits ``[rows, num_labels]`` (not yet fetched)."""
        input_ids, mask = pad_right(ids, rows, length, self.tokenizer.pad_id)
        return self.forward(self.params, input_ids, mask)

    def __call__(self, texts: Sequence[str] | str, progress: bool | None = None) -> list[dict[str, Any]]:
        """``[{"label": "POSITIVE", "score": 0.9998}, ...]``, one per text, in input order."""
        probs = softmax(self.logits(texts, progress))
        best = probs.argmax(axis=-1)
        return [
            {"label": self.config.id2label[int(label)], "score": float(probs[row, label])}
            for row, label in enumerate(best)
        ]


def read_request(raw: str, source: str = "stdin") -> list[str]:
    """JSON ``{"input_data": [...]}`` (the model card's endpoint format), a JSON list of texts, or
    one text per line. A bad request is a ``DataError`` naming ``source``."""
    stripped = raw.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            request = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} starts with {stripped[0]!r} but is not valid JSON: {e}") from None
        if isinstance(request, dict):
            if "input_data" not in request:
                raise DataError(f'{source}: a JSON object must be {{"input_data": [...]}}; got keys {sorted(request)}')
            request = request["input_data"]
    else:
        request = raw.splitlines()
    try:
        return validate_texts(request)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: {e}") from None


def main(args: argparse.Namespace) -> int:
    source = f"--input {args.input}" if args.input else "stdin"
    try:
        data = Path(args.input).read_bytes() if args.input else sys.stdin.buffer.read()
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror or e})") from None
    try:
        raw = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the request
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: {not_utf8(e)}") from None
    texts = read_request(raw, source)
    clf = Classifier.from_pretrained(args.model, dtype=args.dtype, batch_size=args.batch_size,
                                     max_length=args.max_length, key="--model")
    json.dump(clf(texts), sys.stdout)
    sys.stdout.write("\n")
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m flaxsst.predict",
        description='Classify texts: JSON {"input_data": [...]}, a JSON list, or one text per line on stdin '
                    '-> JSON list on stdout.',
    )
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--input", help="read this file instead of stdin")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``flaxsst-predict`` and ``python -m flaxsst.predict``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
