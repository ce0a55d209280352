"""``Classifier``: texts in, Hugging Face pipeline-style predictions out.

>>> clf = Classifier.from_pretrained("distilbert-base-uncased-finetuned-sst-2-english")
>>> clf(["Today was an amazing day!"])
[{'label': 'POSITIVE', 'score': 0.9998...}]

Inputs are sorted by length, cut into batches, and each batch is padded to one of a fixed
set of shapes close to what it needs (``flaxsst.batching``: on a CPU 24 texts padded by less than
1/8 of the longest's length, with no padding rows), so repeated calls reuse compiled programs. On
a CPU two batches run at once (``CPU_CONCURRENT_BATCHES``), float32 dense layers run
``flaxsst.packed_dot``, and with ``dtype="int8"`` the int8 products of ``flaxsst.int8``. With ``pack=True``
several texts share a row (``flaxsst.batching.BatchShapes.pack``), as a server's batches of texts in random
order want. Results come back in input order.

The inference core: the predict command line (``flaxsst.predict``), the server (``flaxsst.serve``),
the bias probe and the benches all call it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxsst import int8, packed_dot
from flaxsst.batching import CPU_INT8_ATTENTION_PER_LENGTH, BatchShapes, PackedBatch, slots
from flaxsst.config import ModelConfig, parse_classifier_dtype
from flaxsst.errors import ConfigError
from flaxsst.metrics import softmax
from flaxsst.model import DistilBertForSequenceClassification, Precision
from flaxsst.program_store import ProgramStore, program_key
from flaxsst.program_store import enabled as store_enabled
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

log = logging.getLogger(__name__)


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
    float32 ``[n, num_labels]``. ``dtype`` is the compute dtype, or ``"int8"`` for int8 dense layers on an
    x86-64 CPU (``int8_lanes`` then non-zero; ``precision`` holds what the model runs with, ``forward``
    the jitted ``(params, input_ids, attention_mask) -> logits``).
    ``batch_size`` and ``length_step`` set the batch shapes (``flaxsst.batching``; default: this
    backend's), or ``lengths`` lists the padded lengths (``flaxsst.batching.serving_lengths``: a server's);
    ``concurrent_batches``, how many run at once (default: ``CPU_CONCURRENT_BATCHES`` on a CPU, 1
    elsewhere). ``build_kernel=False`` uses the packed-dot kernel only if it is built already
    (``flaxsst.packed_dot``). ``pack``: several texts share a row (``BatchShapes.pack``; each attends only to
    its own tokens), so a batch of texts of mixed lengths pads less: a server's batches, drawn at random.
    ``warm_up`` readies every program ahead of the first call; otherwise each compiles on its first use.
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
        lengths: Sequence[int] | None = None,
        concurrent_batches: int | None = None,
        dtype: Any = jnp.float32,
        build_kernel: bool = True,
        pack: bool = False,
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
        self.shapes = BatchShapes.for_backend(backend, max_length, batch_size, length_step, lengths)
        self.config = config
        self.tokenizer = Tokenizer(tokenizer.backend, max_length, tokenizer.lowercase)
        self.batch_size = self.shapes.batch_size
        self.max_length = max_length
        precision, params = cpu_dense_layers(dtype, params, backend, build_kernel)
        self.packed_lanes, self.int8_lanes = precision.packed_lanes, precision.int8_lanes
        if self.int8_lanes:  # the batches' cost model: int8's dense layers are cheaper, its attention is not
            self.shapes = dataclasses.replace(self.shapes, attention_per_length=CPU_INT8_ATTENTION_PER_LENGTH)
        cpu_float32 = backend == "cpu" and precision.dtype == jnp.float32
        self.params = jax.device_put(params)
        self.precision = precision
        model = DistilBertForSequenceClassification(config, precision)
        self.pack = pack
        if pack:  # (params, input_ids, texts, positions, cls_positions) -> logits [rows, slots, labels]
            def apply(p, ids, texts, positions, cls_positions):
                return model.apply({"params": p}, ids, texts, deterministic=True, positions=positions,
                                   cls_positions=cls_positions)
        else:
            apply = lambda p, ids, mask: model.apply({"params": p}, ids, mask, deterministic=True)  # noqa: E731
        self.forward = jax.jit(apply)
        plain = cpu_float32 and not (self.packed_lanes or self.int8_lanes)
        self.small_forward = plain_dot_forward(apply) if plain else None
        self.programs: dict[tuple[int, int], Callable] = {}  # (rows, length) -> its executable, once warm
        self.programs_compiled = 0
        self.all_warm = False  # every shape ready (warm_up): batches may take any of them at no compile

    @functools.cached_property
    def store_key(self) -> str:
        """This model's folder in the program store (``flaxsst.program_store.program_key``), worked out when
        ``warm_up`` first needs it."""
        return program_key({"config": dataclasses.asdict(self.config), "precision": repr(self.precision),
                            "plain_small_dots": self.small_forward is not None, "packed_rows": self.pack,
                            "params": jax.tree_util.tree_map(lambda x: f"{x.dtype}{x.shape}", self.params)})

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "Classifier":
        """From a HF folder or hub id holding weights, ``config.json`` and tokenizer files. ``kwargs``: the
        constructor's (``dtype``, ``batch_size``, ``max_length``, ...) and the hub's (``revision``,
        ``cache_dir``, ``local_files_only``, and ``key``, the setting named in errors)."""
        from flaxsst.convert import read_pretrained
        from flaxsst.hub import resolve_model_dir

        hub = {name: kwargs.pop(name) for name in ("revision", "cache_dir", "local_files_only", "key") if name in kwargs}
        folder = resolve_model_dir(name_or_path, **hub)
        config, params = read_pretrained(folder)
        tokenizer = Tokenizer.from_folder(folder, kwargs.get("max_length", 128))
        return cls(config, params, tokenizer, **kwargs)

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
        lengths = [len(seq) for seq in ids]
        batches = self.shapes.pack(lengths) if self.pack else self.shapes.plan(lengths, least_cost=self.all_warm)
        if progress is None:
            disable = None if len(batches) > 20 else True  # None: tqdm shows the bar only on a terminal
        else:
            disable = not progress

        def run(batch):
            if isinstance(batch, PackedBatch):
                return self.forward_packed(ids, batch)
            return self.forward_batch([ids[i] for i in batch.indices], batch.rows, batch.length)

        with tqdm(total=len(batches), desc="predict", unit="batch", disable=disable) as bar:
            if self.concurrent_batches > 1 and len(batches) > 1:
                # each thread waits for its own batch, so the next starts as soon as one ends
                futures = [self._batch_threads.submit(lambda batch=batch: np.asarray(run(batch))) for batch in batches]
                try:
                    for batch, future in zip(batches, futures):
                        out[batch.indices] = batch.take(future.result())
                        bar.update()
                finally:  # an error or Ctrl-C: the batches not yet started are dropped
                    for future in futures:
                        future.cancel()
            else:  # every batch is queued before the first is fetched
                for batch, logits in [(batch, run(batch)) for batch in batches]:
                    out[batch.indices] = batch.take(np.asarray(logits))
                    bar.update()
        return out

    @functools.cached_property
    def _batch_threads(self) -> concurrent.futures.ThreadPoolExecutor:  # once: a server calls logits_of_ids often
        return concurrent.futures.ThreadPoolExecutor(self.concurrent_batches, thread_name_prefix="flaxsst-batch")

    def forward_batch(self, ids: list[list[int]], rows: int, length: int) -> jax.Array:
        """The one place a batch goes to the device: token ids padded to ``rows`` x ``length`` ->
        logits ``[rows, num_labels]`` (not yet fetched)."""
        input_ids, mask = pad_right(ids, rows, length, self.tokenizer.pad_id)
        program = self.programs.get((rows, length)) or self._jitted(rows, length)
        return program(self.params, input_ids, mask)

    def forward_packed(self, ids: Sequence[Sequence[int]], batch: PackedBatch) -> jax.Array:
        """The texts of ``batch`` (``ids[i]`` for ``i`` in its indices) packed in its rows -> logits
        ``[rows, slots, num_labels]`` (not yet fetched): logits ``[row[i], slot[i]]`` are input ``indices[i]``'s."""
        program = self.programs.get((batch.rows, batch.length)) or self._jitted(batch.rows, batch.length)
        return program(self.params, *batch.arrays(ids, self.tokenizer.pad_id))

    def _program_inputs(self, rows: int, length: int) -> list[jax.ShapeDtypeStruct]:
        """The shapes of a ``(rows, length)`` program's inputs after the parameters."""
        batch = jax.ShapeDtypeStruct((rows, length), np.int32)
        if self.pack:
            return [batch, batch, batch, jax.ShapeDtypeStruct((rows, slots(length)), np.int32)]
        return [batch, batch]

    def _jitted(self, rows: int, length: int) -> Callable:
        small = self.small_forward is not None and rows * length <= CPU_SMALL_BATCH_TOKENS
        return self.small_forward if small else self.forward

    def program_shapes(self) -> list[tuple[int, int]]:
        """Every ``(rows, length)`` a batch of ``logits`` can take: the programs it compiles."""
        return self.shapes.programs()

    def warm_up(self, on_program: Callable[[int, int], None] | None = None, threads: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> int:
        """Load every program ``logits`` can use from the program store (``flaxsst.program_store``), compile
        the ones it lacks (``threads`` at once, default one per core) and store them, so no later call
        compiles; ``on_program(done, total)`` after each; no program starts once ``should_stop()``. Returns
        how many there are (``programs_compiled``: how many of them were compiled, not loaded)."""
        return warm_programs(self, on_program, threads, should_stop)

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


def warm_programs(clf: Classifier, on_program: Callable[[int, int], None] | None, threads: int | None,
                  should_stop: Callable[[], bool] | None) -> int:
    """``Classifier.warm_up``: every program of ``clf`` loaded from the store or compiled (and stored), each
    into ``clf.programs``; then one call, the runtime's first-call set-up, before a request."""
    shapes = [shape for shape in clf.program_shapes() if shape not in clf.programs]
    store = ProgramStore(clf.store_key) if store_enabled() else None
    done, total, lock = len(clf.programs), len(clf.programs) + len(shapes), threading.Lock()
    clf.programs_compiled = 0

    def ready(shape: tuple[int, int]) -> None:
        nonlocal done
        if should_stop is not None and should_stop():  # a stopped process exits in seconds
            return
        rows, length = shape
        program = store.load(rows, length) if store is not None else None
        if program is None:
            with lock:
                clf.programs_compiled += 1
            program = clf._jitted(rows, length).lower(clf.params, *clf._program_inputs(rows, length)).compile()
            if store is not None:
                store.save(rows, length, program)
        with lock:
            clf.programs[shape] = program
            done += 1
            if on_program is not None:
                on_program(done, total)

    if shapes:  # XLA compiles and loads outside the GIL: one program per core at once
        with (without_compilation_cache() if store is not None else contextlib.nullcontext()), \
                concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1,
                                                      thread_name_prefix="flaxsst-compile") as pool:
            for future in [pool.submit(ready, shape) for shape in shapes]:
                future.result()
    clf.all_warm = len(clf.programs) == len(clf.program_shapes())
    if clf.programs and len(clf.programs) == total:  # the runtime's first-call set-up, before a request
        ids = [[clf.tokenizer.cls_id, clf.tokenizer.sep_id]]
        if clf.pack:
            clf.forward_packed(ids, clf.shapes.pack([2])[0]).block_until_ready()
        else:
            clf.forward_batch(ids, *min(clf.programs)).block_until_ready()
    return total


@contextlib.contextmanager
def without_compilation_cache():
    """Inside, every compile in this process is done afresh, never answered by JAX's persistent cache:
    an executable the cache answers serializes without its kernels' code (it loads, then fails with
    "Function ... not found"), so what the program store keeps must not come from it. JAX decides
    once per process whether the cache is in use (``is_cache_used``), at the first compile, whichever
    thread it runs on: the flag is turned off for the whole process and that decision reset, on the
    way in and on the way out."""
    from jax._src import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def plain_dot_forward(apply):
    """``apply`` jitted with ``CPU_PLAIN_DOTS``, or None where this jaxlib has no such option (it
    predates YNNPACK, and its dots are XLA's own already)."""
    try:
        jax.jit(jnp.matmul, compiler_options=CPU_PLAIN_DOTS).lower(np.ones((2, 2), np.float32),
                                                                   np.ones((2, 2), np.float32)).compile()
    except (RuntimeError, TypeError):  # JaxRuntimeError: "No such compile option"
        return None
    return jax.jit(apply, compiler_options=CPU_PLAIN_DOTS)


def cpu_dense_layers(dtype: Any, params: dict, backend: str, build_kernel: bool) -> tuple[Precision, dict]:
    """The ``Precision`` a Classifier of ``dtype`` runs with on ``backend``, and ``params`` made ready for it.

    float32 on a CPU: every dense layer runs flaxsst.packed_dot over kernels packed for it (0.68-0.79x the
    time of XLA's and YNNPACK's dots at 1-24 rows, 0.99x at 1536; bench/RESULTS.md); where it cannot, XLA's
    dots for the smallest batches and YNNPACK's for the rest. int8: the dense layers' products in int8
    (flaxsst.int8) where this CPU runs the kernel, else float32, with a warning."""
    dtype = parse_classifier_dtype(dtype)
    wants_int8 = isinstance(dtype, str)  # "int8": float32 activations around int8 products
    precision = Precision(jnp.float32 if wants_int8 else dtype, float32_accumulation=backend == "cpu")
    params = inference_params(params, precision.dtype)
    lanes = packed_dot.load(build=build_kernel) if backend == "cpu" and precision.dtype == jnp.float32 else None
    if wants_int8:
        if backend != "cpu":
            log.warning("dtype int8 runs on a CPU; this %s runs float32", backend)
        elif not lanes:
            log.warning("dtype int8 runs float32 here: %s", packed_dot.unavailable_reason())
        elif not packed_dot.int8_levels(build=build_kernel):
            log.warning("dtype int8 runs float32 here: its kernel needs AVX2 (or AVX-512BW)")
        else:
            quantized = int8.quantize_params(params, lanes, packed_dot.int8_pairs(build=build_kernel))
            if any(np.dtype(leaf.dtype) == np.int8 for leaf in jax.tree_util.tree_leaves(quantized)):
                return dataclasses.replace(precision, int8_lanes=lanes), quantized
            log.warning("dtype int8 runs float32 here: no dense layer of this model has outputs a multiple of %d",
                        2 * lanes)
    if lanes:
        return dataclasses.replace(precision, packed_lanes=lanes), packed_dot.pack_params(params, lanes)
    return precision, params


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
