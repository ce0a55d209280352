"""Dynamic batching: the texts of concurrent requests share the model's batches.

Requests ``submit`` their token ids from any thread (the event loop, or a WSGI server's threads)
and get a ``concurrent.futures.Future``. One inference thread owns every JAX call: it takes the
oldest waiting texts up to ``max_batch_texts`` rows and ``max_batch_tokens`` tokens, waiting at
most ``max_delay_s`` after the oldest arrived for the batch to fill, runs one
``Classifier.logits_of_ids`` and hands each request its own rows, in its own order. A request
larger than one batch spans several; a cancelled future's texts that have not started are dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from flaxsst.errors import ConfigError

log = logging.getLogger("flaxsst.serve")


class QueueFull(Exception):
    """More requests are waiting than ``max_queue``: the caller answers 429."""


class Stopped(Exception):
    """The batcher is stopping and takes no new requests."""


@dataclasses.dataclass
class Job:
    """One request's texts: ``ids`` in, ``logits`` ``[len(ids), num_labels]`` out; ``queue_s`` from
    submit to its first batch, ``inference_s`` the model time of the batches it was in,
    ``batch_requests`` the most requests that shared one of them."""

    ids: Sequence[Sequence[int]]
    logits: np.ndarray
    future: concurrent.futures.Future
    submitted: float
    taken: int = 0
    remaining: int = 0
    queue_s: float | None = None
    inference_s: float = 0.0
    batch_requests: int = 0


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What one batch ran: passed to ``on_batch`` for the metrics."""

    texts: int
    tokens: int
    requests: int
    seconds: float


class Batcher:
    """Shared batches over one ``Classifier`` (``classifier.logits_of_ids`` is the only model call).

    ``start()`` runs ``classifier.warm_up()`` on the inference thread and then serves; ``ready`` is set
    once every program is warm. ``stop()`` answers everything submitted and ends the thread.
    """

    def __init__(self, classifier, *, max_batch_texts: int, max_batch_tokens: int, max_delay_s: float,
                 max_queue: int, on_batch: Callable[[BatchStats], None] | None = None):
        for name, value in (("max_batch_texts", max_batch_texts), ("max_batch_tokens", max_batch_tokens),
                            ("max_queue", max_queue)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if max_delay_s < 0:
            raise ConfigError(f"max_delay_s={max_delay_s} must be 0 or more")
        self.classifier = classifier
        self.num_labels = classifier.config.num_labels
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.ready = threading.Event()
        self.programs = 0
        self.warm_up_s: float | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._waiting_texts = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the inference thread (once; a second call does nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="flaxsst-inference", daemon=True)
        self._thread.start()

    def queue_depth(self) -> tuple[int, int]:
        """``(requests, texts)`` waiting for a batch."""
        with self._condition:
            return len(self._waiting), self._waiting_texts

    def submit(self, ids: Sequence[Sequence[int]]) -> concurrent.futures.Future:
        """Queue one request's token ids; the future's result is its ``Job`` (``job.logits`` in order).
        Raises ``QueueFull`` past ``max_queue`` waiting requests and ``Stopped`` once stopping."""
        job = Job(ids, np.zeros((len(ids), self.num_labels), np.float32), concurrent.futures.Future(),
                  time.perf_counter(), remaining=len(ids))
        if not ids:
            job.queue_s = 0.0
            job.future.set_result(job)
            return job.future
        with self._condition:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._waiting_texts += len(ids)
            self._condition.notify()
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, answer the waiting ones, and end the inference thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        started = time.perf_counter()
        self.programs = self.classifier.warm_up()
        self.warm_up_s = time.perf_counter() - started
        log.info("ready: %d programs warm in %.1f s", self.programs, self.warm_up_s)
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[tuple[Job, int, int]] | None:
        """``(job, start, stop)`` pieces of the next batch, oldest texts first; ``None`` once stopped and empty."""
        with self._condition:
            while True:
                self._drop_cancelled()
                if self._waiting:
                    texts, tokens = self._budget_used()
                    full = texts >= self.max_batch_texts or tokens >= self.max_batch_tokens
                    wait = self._waiting[0].submitted + self.max_delay_s - time.perf_counter()
                    if full or wait <= 0 or self._stopping:
                        return self._take()
                    self._condition.wait(wait)
                elif self._stopping:
                    return None
                else:
                    self._condition.wait()

    def _drop_cancelled(self) -> None:
        kept = [job for job in self._waiting if not job.future.cancelled()]
        if len(kept) != len(self._waiting):
            self._waiting = collections.deque(kept)
            self._waiting_texts = sum(len(job.ids) - job.taken for job in kept)

    def _budget_used(self) -> tuple[int, int]:
        """Texts and tokens the waiting texts would fill a batch with (capped at the budget)."""
        texts = tokens = 0
        for job in self._waiting:
            for seq in job.ids[job.taken:]:
                if texts >= self.max_batch_texts or tokens >= self.max_batch_tokens:
                    return texts, tokens
                texts += 1
                tokens += len(seq)
        return texts, tokens

    def _take(self) -> list[tuple[Job, int, int]]:
        pieces = []
        texts = tokens = 0
        while self._waiting:
            job = self._waiting[0]
            start = stop = job.taken
            while stop < len(job.ids):
                length = len(job.ids[stop])
                if texts and (texts + 1 > self.max_batch_texts or tokens + length > self.max_batch_tokens):
                    break
                texts += 1
                tokens += length
                stop += 1
            if stop == start:
                break
            pieces.append((job, start, stop))
            job.taken = stop
            self._waiting_texts -= stop - start
            if stop < len(job.ids):
                break
            self._waiting.popleft()
        return pieces

    def _run_batch(self, pieces: list[tuple[Job, int, int]]) -> None:
        now = time.perf_counter()
        ids = []
        for job, start, stop in pieces:
            if job.queue_s is None:
                job.queue_s = now - job.submitted
            ids.extend(job.ids[start:stop])
        try:
            logits = self.classifier.logits_of_ids(ids, progress=False)
        except Exception as error:  # a bug of ours: every request in the batch fails with it (a 500)
            log.exception("inference failed on a batch of %d texts", len(ids))
            for job, _, _ in pieces:
                self._settle(job, error)
            return
        seconds = time.perf_counter() - now
        row = 0
        for job, start, stop in pieces:
            job.logits[start:stop] = logits[row : row + stop - start]
            row += stop - start
            job.inference_s += seconds
            job.batch_requests = max(job.batch_requests, len(pieces))
            job.remaining -= stop - start
            if job.remaining == 0:
                self._settle(job)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(ids), sum(len(seq) for seq in ids), len(pieces), seconds))

    @staticmethod
    def _settle(job: Job, error: BaseException | None = None) -> None:
        try:
            if error is None:
                job.future.set_result(job)
            else:
                job.future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled by its caller (timed out) meanwhile
            pass
