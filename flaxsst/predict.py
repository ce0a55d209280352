"""``Classifier``: texts in, Hugging Face pipeline-style predictions out.

>>> clf = Classifier.from_pretrained("distilbert-base-uncased-finetuned-sst-2-english")
>>> clf(["Today was an amazing day!"])
[{'label': 'POSITIVE', 'score': 0.9998...}]

Inputs are sorted by length, cut into batches, and each batch is padded to one of a fixed
set of shapes close to what it needs (``flaxsst.batching``: on a CPU 24 texts padded by less than
1/8 of the longest's length, with no padding rows), so repeated calls reuse compiled programs. On
a CPU two batches run at once (``CPU_CONCURRENT_BATCHES``), and float32 dense layers run
``flaxsst.packed_dot``. Results come back in input order.

Command line: ``python -m flaxsst.predict --model DIR_OR_HUB_ID`` reads JSON
``{"input_data": [...]}`` or a JSON list of texts and prints the JSON list, or one text per line
and streams a JSON line per text (``flaxsst.predict_stream``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxsst import cli, packed_dot
from flaxsst.batching import BatchShapes
from flaxsst.config import ModelConfig
from flaxsst.errors import ConfigError, DataError
from flaxsst.metrics import softmax
from flaxsst.model import DistilBertForSequenceClassification, Precision
from flaxsst.runtime import enable_compilation_cache
from flaxsst.tokenizer import Tokenizer, pad_right

# Batches a CPU runs at once, each from its own thread: XLA:CPU keeps both cores of a 2-core machine
# busier with two programs than with one (5-9% more texts/s on the SST-2 dev set, bench/RESULTS.md).
# An accelerator queues its launches already.
CPU_CONCURRENT_BATCHES = 2

# Where the packed dots cannot run (flaxsst.packed_dot.load), a float32 CPU batch of at most this many
# tokens (one sentence) runs XLA's own dot kernels instead of YNNPACK fusions: 9-18% faster on 10-22
# tokens, slower from 24 (bench/RESULTS.md). The option leaves XLA's YNNPACK fusion list empty.
CPU_SMALL_BATCH_TOKENS = 22
CPU_PLAIN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


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
    ``batch_size`` and ``length_step`` set the batch shapes (``flaxsst.batching``; default: this
    backend's); ``concurrent_batches``, how many run at once (default: ``CPU_CONCURRENT_BATCHES`` on a
    CPU, 1 elsewhere).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        tokenizer: Tokenizer,
        *,
        batch_size: int | None = None,
        max_length: int = 128,
        length_step: int | None = None,
        concurrent_batches: int | None = None,
        dtype: Any = jnp.float32,
        model: nn.Module | None = None,
    ):
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ConfigError(f"max_length={max_length} must lie in [2, {config.max_position_embeddings}] "
                              "(the model's max_position_embeddings)")
        if concurrent_batches is not None and concurrent_batches < 1:
            raise ConfigError(f"concurrent_batches={concurrent_batches} must be at least 1")
        enable_compilation_cache()
        backend = jax.default_backend()
        if concurrent_batches is None:
            concurrent_batches = CPU_CONCURRENT_BATCHES if backend == "cpu" else 1
        self.concurrent_batches = concurrent_batches
        self.shapes = BatchShapes.for_backend(backend, max_length, batch_size, length_step)
        self.config = config
        self.tokenizer = Tokenizer(tokenizer.backend, max_length, tokenizer.lowercase)
        self.batch_size = self.shapes.batch_size
        self.max_length = max_length
        precision = Precision(dtype, float32_accumulation=backend == "cpu")
        params = inference_params(params, precision.dtype)
        # float32 on a CPU: every dense layer runs flaxsst.packed_dot over kernels packed for it (0.68-0.79x
        # the time of XLA's and YNNPACK's dots at 1-24 rows, 0.99x at 1536; bench/RESULTS.md); where it
        # cannot, XLA's dots for the smallest batches and YNNPACK's for the rest
        cpu_float32 = backend == "cpu" and precision.dtype == jnp.float32
        self.packed_lanes = (packed_dot.load() or 0) if cpu_float32 and model is None else 0
        if self.packed_lanes:
            precision = dataclasses.replace(precision, packed_lanes=self.packed_lanes)
            params = packed_dot.pack_params(params, self.packed_lanes)
        self.params = jax.device_put(params)
        self.model = model or DistilBertForSequenceClassification(config, precision)
        apply = lambda p, ids, mask: self.model.apply({"params": p}, ids, mask, deterministic=True)  # noqa: E731
        self.forward = jax.jit(apply)
        self.small_forward = plain_dot_forward(apply) if cpu_float32 and not self.packed_lanes else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = jnp.float32,
        batch_size: int | None = None,
        max_length: int = 128,
        length_step: int | None = None,
        concurrent_batches: int | None = None,
        **hub_kwargs: Any,
    ) -> "Classifier":
        """From a HF folder or hub id holding weights, ``config.json`` and tokenizer files (``hub_kwargs``:
        ``revision``, ``cache_dir``, ``local_files_only``, and ``key``, the setting named in errors)."""
        from flaxsst.convert import load_pretrained
        from flaxsst.hub import resolve_model_dir

        folder = resolve_model_dir(name_or_path, **hub_kwargs)
        config, params = load_pretrained(folder)
        tokenizer = Tokenizer.from_pretrained(folder, max_length)
        return cls(config, params, tokenizer, batch_size=batch_size, max_length=max_length, length_step=length_step,
                   concurrent_batches=concurrent_batches, dtype=dtype)

    def encode(self, texts: Sequence[str] | str) -> list[list[int]]:
        """Token ids of each text (validated as ``logits`` does), truncated to ``max_length``."""
        return self.tokenizer.encode(validate_texts(texts))

    def logits(self, texts: Sequence[str] | str, progress: bool | None = None) -> np.ndarray:
        """float32 logits ``[len(texts), num_labels]``, in input order.

        ``progress``: a tqdm bar over batches; ``None`` shows one for long inputs on a terminal.
        """
        return self.logits_of_ids(self.encode(texts), progress)

    def logits_of_ids(self, ids: Sequence[Sequence[int]], progress: bool | None = None) -> np.ndarray:
        """``logits`` of texts already encoded (``encode``): float32 ``[len(ids), num_labels]``, in order."""
        out = np.zeros((len(ids), self.config.num_labels), dtype=np.float32)
        if not len(ids):
            return out
        batches = self.shapes.plan([len(seq) for seq in ids])
        if progress is None:
            disable = None if len(batches) > 20 else True  # None: tqdm shows the bar only on a terminal
        else:
            disable = not progress

        def run(batch):
            return self.forward_batch([ids[i] for i in batch.indices], batch.rows, batch.length)

        with tqdm(total=len(batches), desc="predict", unit="batch", disable=disable) as bar:
            if self.concurrent_batches > 1 and len(batches) > 1:
                pool = concurrent.futures.ThreadPoolExecutor(self.concurrent_batches, thread_name_prefix="flaxsst-batch")
                try:  # each thread waits for its own batch, so the next starts as soon as one ends
                    results = zip(batches, pool.map(lambda batch: np.asarray(run(batch)), batches))
                    for batch, logits in results:
                        out[batch.indices] = logits[: len(batch.indices)]
                        bar.update()
                finally:  # an error or Ctrl-C: the batches not yet started are dropped
                    pool.shutdown(cancel_futures=True)
            else:  # every batch is queued before the first is fetched
                for batch, logits in [(batch, run(batch)) for batch in batches]:
                    out[batch.indices] = np.asarray(logits)[: len(batch.indices)]
                    bar.update()
        return out

    def forward_batch(self, ids: list[list[int]], rows: int, length: int) -> jax.Array:
        """The one place a batch goes to the device: token ids padded to ``rows`` x ``length`` ->
        logits ``[rows, num_labels]`` (not yet fetched)."""
        input_ids, mask = pad_right(ids, rows, length, self.tokenizer.pad_id)
        small = self.small_forward is not None and rows * length <= CPU_SMALL_BATCH_TOKENS
        return (self.small_forward if small else self.forward)(self.params, input_ids, mask)

    def program_shapes(self) -> list[tuple[int, int]]:
        """Every ``(rows, length)`` a batch of ``logits`` can take: the programs it compiles."""
        return self.shapes.programs()

    def warm_up(self) -> int:
        """Compile (or load from the cache) and run every program ``logits`` can use, so no later call
        compiles; returns how many there are."""
        shapes = self.program_shapes()
        for rows, length in shapes:
            self.forward_batch([[self.tokenizer.cls_id, self.tokenizer.sep_id]], rows, length).block_until_ready()
        return len(shapes)

    def predictions(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """``[{"label": ..., "score": ...}, ...]`` of each row of ``logits``: the best label and its softmax."""
        probs = softmax(logits)
        best = probs.argmax(axis=-1)
        return [
            {"label": self.config.id2label[int(label)], "score": float(probs[row, label])}
            for row, label in enumerate(best)
        ]

    def __call__(self, texts: Sequence[str] | str, progress: bool | None = None) -> list[dict[str, Any]]:
        """``[{"label": "POSITIVE", "score": 0.9998}, ...]``, one per text, in input order."""
        return self.predictions(self.logits(texts, progress))


def plain_dot_forward(apply):
    """``apply`` jitted with ``CPU_PLAIN_DOTS``, or None where this jaxlib has no such option (it
    predates YNNPACK, and its dots are XLA's own already)."""
    try:
        jax.jit(jnp.matmul, compiler_options=CPU_PLAIN_DOTS).lower(np.ones((2, 2), np.float32),
                                                                   np.ones((2, 2), np.float32)).compile()
    except (RuntimeError, TypeError):  # JaxRuntimeError: "No such compile option"
        return None
    return jax.jit(apply, compiler_options=CPU_PLAIN_DOTS)


def inference_params(params: dict, dtype: Any) -> dict:
    """``params`` with every matmul and embedding tensor stored in ``dtype``, the LayerNorm scales and
    biases kept in float32: the values the model computes with, cast once instead of at every call."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.float32):
        return params

    def cast(path, leaf):
        names = [str(getattr(key, "key", key)).replace("_", "").lower() for key in path]
        return leaf if any(name.endswith("layernorm") for name in names) else jnp.asarray(leaf, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


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
    from flaxsst.predict_stream import check_output_file, count_lines, predict_stream, sigterm_as_ctrl_c

    source = f"--input {args.input}" if args.input else "stdin"
    if args.output:
        check_output_file(args.output)
    try:
        stream = open(args.input, "rb") if args.input else sys.stdin.buffer
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror or e})") from None
    with stream, sigterm_as_ctrl_c():
        total = count_lines(args.input) if args.input else None
        clf = Classifier.from_pretrained(args.model, dtype=args.dtype, batch_size=args.batch_size,
                                         max_length=args.max_length, length_step=args.length_step, key="--model")
        predict_stream(clf, stream, source, args.format, args.output, total)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m flaxsst.predict",
        description='Classify texts. One text per line (stdin or --input) is answered as it is read: a JSON '
                    'line per text, in input order, memory flat whatever the input size, progress on stderr. '
                    'JSON {"input_data": [...]} or a JSON list is answered with a JSON list.',
    )
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--input", help="read this file instead of stdin")
    p.add_argument("--output", help="write the answers to this file (atomically: complete or not at all) "
                                    "instead of stdout")
    p.add_argument("--format", choices=["auto", "jsonl", "json"], default="auto",
                   help="jsonl: one JSON object per line; json: one JSON list; auto (default): jsonl for "
                        "one text per line, json for a JSON request")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (default: 24 on a CPU, 128 elsewhere)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--length-step", type=int, default=None,
                   help="pad batches to multiples of this many tokens: fewer programs to compile (default: the "
                        "backend's lengths, flaxsst.batching)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``flaxsst-predict`` and ``python -m flaxsst.predict``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
