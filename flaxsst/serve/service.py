"""The one serving pipeline every front end calls: texts -> token ids -> the shared batches -> logits.

As in text-embeddings-inference's ``core/src/infer.rs``, the HTTP app (``flaxsst.serve.app``), Azure
ML's scoring script (``flaxsst.serve.azureml_score``) and any later front end are thin adapters:
each reads its request into texts, calls ``Service.classify`` (or ``classify_async`` from an event
loop) with a deadline, and maps the one error it raises, ``Rejected``, to its own answer in one
place (HTTP statuses: ``flaxsst.serve.protocol.HTTP_STATUS``).

``Service`` owns the model's thread: it warms every program ``Classifier`` can run (``ready`` is set
after, and ``warm_up`` tells how far it is), then runs the batches ``flaxsst.serve.batcher`` cuts from
the waiting requests until ``stop``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from flaxsst.runtime import release_free_memory
from flaxsst.serve.batcher import Batcher, Job, QueueFull, Stopped

log = logging.getLogger("flaxsst.serve")

# On a CPU a shared batch holds several of Classifier's batches: it sorts them by length before it cuts
# them, so each is padded close to its own texts (a batch of 24 texts in arrival order pads to the
# longest of 24 random lengths, ~2x the tokens SST-2 needs), and runs two of them at once.
CPU_BATCHES_PER_CALL, CPU_MAX_BATCH_TOKENS, CPU_MAX_BATCH_DELAY_MS = 5, 4096, 2.0
ACCELERATOR_BATCHES_PER_CALL, ACCELERATOR_MAX_BATCH_TOKENS, ACCELERATOR_MAX_BATCH_DELAY_MS = 1, 16384, 1.0
WARM_UP_LOG_EVERY_S = 5.0
TOKENIZING_THREADS = 2

# Why a request is refused; each front end maps these to its own answer.
MALFORMED, TOO_LARGE, INVALID, OVERLOADED, WARMING, STOPPING, TIMEOUT, UNKNOWN_MODEL = (
    "malformed", "too_large", "invalid", "overloaded", "warming", "stopping", "timeout", "unknown_model")


def load_classifier(model: str, *, dtype: str = "float32", batch_size: int | None = None, max_length: int = 128,
                    length_step: int | None = None, key: str = "--model", build_kernel: bool = False):
    """The ``Classifier`` a server runs: the backend's serving lengths (``flaxsst.batching.serving_lengths``:
    fewer programs to hold and warm) unless ``length_step`` sets them, and the packed-dot kernel only
    where it is built already (``build_kernel``: the prepare step builds it). On a CPU several texts share a
    row (``Classifier``'s ``pack``): a server's batches are texts of every length at once. On a GPU the process takes
    device memory as it needs it, not JAX's default 75% of the card up front, so replicas can share a
    card; ``XLA_PYTHON_CLIENT_PREALLOCATE`` or ``XLA_PYTHON_CLIENT_MEM_FRACTION`` set by the user win."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:  # read when the backend starts, below
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from flaxsst.batching import serving_lengths
    from flaxsst.classifier import Classifier

    lengths = None if length_step else serving_lengths(jax.default_backend(), max_length)
    return Classifier.from_pretrained(model, dtype=dtype, batch_size=batch_size, max_length=max_length,
                                      length_step=length_step, lengths=lengths, build_kernel=build_kernel, key=key,
                                      pack=jax.default_backend() == "cpu")


class Rejected(Exception):
    """A request the service does not answer with predictions: ``reason`` (one of the constants
    above) and a one-line message naming the problem."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the service takes: batching and limits. ``None`` batching values take the backend's
    defaults (``resolved``). Their names are the server's flags (``--max-batch-texts``, ...)."""

    max_batch_texts: int | None = None
    max_batch_tokens: int | None = None
    max_batch_delay_ms: float | None = None
    max_queue: int = 256
    max_texts: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_ms: float = 30000.0
    retry_after_s: int = 1

    def resolved(self, backend: str, batch_size: int) -> "Settings":
        """Every ``None`` replaced by ``backend``'s default for a ``Classifier`` of ``batch_size`` rows."""
        cpu = backend == "cpu"
        per_call = CPU_BATCHES_PER_CALL if cpu else ACCELERATOR_BATCHES_PER_CALL
        defaults = {"max_batch_texts": per_call * batch_size,
                    "max_batch_tokens": CPU_MAX_BATCH_TOKENS if cpu else ACCELERATOR_MAX_BATCH_TOKENS,
                    "max_batch_delay_ms": CPU_MAX_BATCH_DELAY_MS if cpu else ACCELERATOR_MAX_BATCH_DELAY_MS}
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1e3


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What one batch ran: passed to ``on_batch`` (the metrics)."""

    texts: int
    tokens: int
    requests: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request's logits ``[texts, num_labels]`` in its order, and where its time went (seconds)."""

    logits: np.ndarray
    tokenization_s: float
    queue_s: float
    inference_s: float
    batch_requests: int


class WarmUp:
    """How far the warm-up is: programs done of ``total``, elapsed seconds and an ETA at the pace so far."""

    def __init__(self, total: int = 0):
        self.total, self.done, self.started, self.seconds = total, 0, time.perf_counter(), None

    def run(self, classifier, should_stop: Callable[[], bool] | None = None) -> None:
        """``classifier.warm_up()``, timed, with a progress line every ``WARM_UP_LOG_EVERY_S``."""
        self.started, self.seconds = time.perf_counter(), None
        classifier.warm_up(log_warm_up(self), should_stop=should_stop)
        self.seconds = time.perf_counter() - self.started

    def describe(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started if self.seconds is None else self.seconds
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return {"programs": self.total, "done": self.done, "elapsed_s": round(elapsed, 1),
                "eta_s": None if eta is None else round(eta, 1)}


def log_warm_up(progress: WarmUp) -> Callable[[int, int], None]:
    """A ``Classifier.warm_up`` callback that keeps ``progress`` and logs it every ``WARM_UP_LOG_EVERY_S``."""
    last_line = time.perf_counter()

    def on_program(done: int, total: int) -> None:
        nonlocal last_line
        progress.done, progress.total = done, total
        if time.perf_counter() - last_line >= WARM_UP_LOG_EVERY_S and done < total:
            last_line = time.perf_counter()
            state = progress.describe()
            log.info("warming up: %d/%d programs, %.0f s elapsed, about %.0f s left", done, total,
                     state["elapsed_s"], state["eta_s"])

    return on_program


class Service:
    """Requests -> the shared batches of one ``Classifier``. ``start()`` warms up and serves on the
    model's thread; ``stop()`` answers everything submitted and ends it. ``on_batch(BatchStats)`` is
    called after every batch, ``on_fatal(error)`` if the warm-up fails."""

    def __init__(self, classifier, settings: Settings, on_batch: Callable[[BatchStats], None] | None = None,
                 setting_names: dict[str, str] | None = None, on_fatal: Callable[[BaseException], None] | None = None):
        self.classifier = classifier
        self.settings = settings
        self.setting_names = setting_names or {}  # how a front end's user sets a field, for the messages
        self.batcher = Batcher(classifier.config.num_labels, max_batch_texts=settings.max_batch_texts,
                               max_batch_tokens=settings.max_batch_tokens,
                               max_delay_s=settings.max_batch_delay_ms / 1e3, max_queue=settings.max_queue)
        self.on_batch = on_batch
        self.on_fatal = on_fatal  # called from the model's thread when the warm-up fails
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.warm_up = WarmUp(len(classifier.program_shapes()))
        # Tokenizing is the largest part of a request's work on the event loop (42% of its busy time in a
        # profile under load): off the loop, on threads of its own (the tokenizer lets go of the GIL)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(TOKENIZING_THREADS, thread_name_prefix="flaxsst-tokenize")
        self.compiles_while_serving = 0  # XLA compiles once ready: none is expected (a request never waits on one)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the model's thread (once; a second call does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flaxsst-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, answer the waiting ones (or end a warm-up), and end the model's thread."""
        self.stopping.set()
        self.batcher.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_depth(self) -> tuple[int, int]:
        """``(requests, texts)`` waiting for a batch."""
        return self.batcher.queue_depth()

    def submit(self, texts: Sequence[str]) -> tuple[concurrent.futures.Future, float]:
        """Encode ``texts`` and queue them; -> (the future of their ``Job``, seconds spent tokenizing)."""
        if not self.ready.is_set():  # a request never waits behind the warm-up: the client retries
            state = self.warm_up.describe()
            raise Rejected(WARMING, f"warming up: {state['done']}/{state['programs']} programs ready; retry after "
                                    f"{self.settings.retry_after_s} s")
        if len(texts) > self.settings.max_texts:
            raise Rejected(TOO_LARGE, f"{len(texts)} texts, more than {self.name('max_texts')} {self.settings.max_texts}")
        started = time.perf_counter()
        try:
            ids = self.classifier.encode(texts)
        except (TypeError, ValueError) as e:
            raise Rejected(INVALID, str(e)) from None
        tokenization_s = time.perf_counter() - started
        try:
            return self.batcher.submit(ids), tokenization_s
        except QueueFull as e:
            raise Rejected(OVERLOADED, f"overloaded: {e} ({self.name('max_queue')} {self.settings.max_queue}); retry "
                                       f"after {self.settings.retry_after_s} s") from None
        except Stopped as e:
            raise Rejected(STOPPING, str(e)) from None

    def classify(self, texts: Sequence[str], deadline: float) -> Answer:
        """``texts`` -> their ``Answer``, waiting in this thread until ``deadline`` (``time.perf_counter()``)."""
        future, tokenization_s = self.submit(texts)
        try:
            job = future.result(max(deadline - time.perf_counter(), 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()  # its texts not yet in a batch are dropped
            raise self._timed_out() from None
        return _answer(job, tokenization_s)

    async def classify_async(self, texts: Sequence[str], deadline: float) -> Answer:
        """``classify`` from an event loop: the texts are tokenized on a thread of their own, so the loop
        goes on answering (probes, other requests) meanwhile and while they wait for their batches."""
        future, tokenization_s = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self.submit, texts)
        try:
            job = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.perf_counter(), 0.0))
        except asyncio.TimeoutError:  # wait_for cancels the future: its texts not yet in a batch are dropped
            raise self._timed_out() from None
        return _answer(job, tokenization_s)

    def _timed_out(self) -> Rejected:
        return Rejected(TIMEOUT, f"not answered within {self.name('timeout_ms')} {self.settings.timeout_ms:.0f}")

    def name(self, field: str) -> str:
        """How the user sets ``field`` of the settings: the server's flag unless the front end names it."""
        return self.setting_names.get(field, "--" + field.replace("_", "-"))

    def _run(self) -> None:
        try:
            if not self._warm():
                return
        except Exception as error:  # nothing can be served: the front end ends the process
            log.exception("warm-up failed")
            if self.on_fatal is not None:
                self.on_fatal(error)
            return
        try:
            while (pieces := self.batcher.next_batch()) is not None:
                self._run_batch(pieces)
        finally:
            self._unwatch()

    def _warm(self) -> bool:
        """Every program ``Classifier`` can run, loaded from the program store or compiled, with a progress
        line every ``WARM_UP_LOG_EVERY_S``; then the garbage of it goes back to the system. False when
        ``stop()`` came first."""
        progress = self.warm_up
        progress.run(self.classifier, self.stopping.is_set)
        if self.stopping.is_set():
            log.info("warm-up stopped at %d of %d programs", progress.done, progress.total)
            return False
        release_free_memory()
        self._unwatch = watch_compiles(self)
        compiled = self.classifier.programs_compiled
        log.info("ready: %d programs warm in %.1f s (%d from the program store, %d compiled)", progress.total,
                 progress.seconds, progress.total - compiled, compiled)
        self.ready.set()
        return True

    def _run_batch(self, pieces) -> None:
        ids = self.batcher.ids_of(pieces)
        started = time.perf_counter()
        try:
            logits = self.classifier.logits_of_ids(ids, progress=False)
        except Exception as error:  # a bug of ours: every request in the batch fails with it (a 500)
            log.exception("inference failed on a batch of %d texts", len(ids))
            self.batcher.fail(pieces, error)
            return
        seconds = time.perf_counter() - started
        self.batcher.finish(pieces, logits, seconds)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(ids), sum(len(seq) for seq in ids), len(pieces), seconds))


def watch_compiles(service: Service) -> Callable[[], None]:
    """Count every XLA compile in this process in ``service.compiles_while_serving`` until the returned
    function is called."""
    import jax

    def count(event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            service.compiles_while_serving += 1
            log.warning("a program compiled while serving (%.1f s): a request waited for it", duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    return lambda: jax.monitoring.unregister_event_duration_listener(count)


def _answer(job: Job, tokenization_s: float) -> Answer:
    return Answer(job.logits, tokenization_s, job.queue_s or 0.0, job.inference_s, job.batch_requests)
