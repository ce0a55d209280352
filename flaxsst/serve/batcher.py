"""Dynamic batching: the queue the texts of concurrent requests wait in, and its batching rule.

Requests ``submit`` their token ids from any thread (the event loop, or a WSGI server's threads)
and get a ``concurrent.futures.Future``. The one thread that runs the model (``flaxsst.serve.service``)
calls ``next_batch``: the oldest waiting texts up to ``max_batch_texts`` rows and
``max_batch_tokens`` tokens, waiting at most ``max_delay_s`` after the oldest arrived for the batch
to fill; ``finish`` hands each request its own rows of the batch's logits, in its own order. A
request larger than one batch spans several; a cancelled future's texts that have not started are
dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Sequence

import numpy as np

from flaxsst.errors import ConfigError

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


Piece = tuple[Job, int, int]  # a request's texts [start, stop) in one batch

class Batcher:
    """The waiting requests of one model with ``num_labels`` outputs. ``stop()`` takes no new
    requests; ``next_batch`` returns ``None`` once stopped and empty."""

    def __init__(self, num_labels: int, *, max_batch_texts: int, max_batch_tokens: int, max_delay_s: float,
                 max_queue: int):
        for name, value in (("max_batch_texts", max_batch_texts), ("max_batch_tokens", max_batch_tokens),
                            ("max_queue", max_queue)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if max_delay_s < 0:
            raise ConfigError(f"max_delay_s={max_delay_s} must be 0 or more")
        self.num_labels = num_labels
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._waiting_texts = 0
        self._condition = threading.Condition()
        self._stopping = False

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
                self._drop_cancelled()  # a request that timed out holds no place
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(job)
            self._waiting_texts += len(ids)
            self._condition.notify()
        return job.future

    def stop(self) -> None:
        """Take no new requests; the waiting ones still come out of ``next_batch``."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def next_batch(self) -> list[Piece] | None:
        """The pieces of the next batch, oldest texts first; ``None`` once stopped and empty."""
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

    def _take(self) -> list[Piece]:
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

    @staticmethod
    def ids_of(pieces: list[Piece]) -> list[Sequence[int]]:
        """The token ids of a batch, piece after piece; marks each request's wait for its first batch."""
        now = time.perf_counter()
        ids = []
        for job, start, stop in pieces:
            if job.queue_s is None:
                job.queue_s = now - job.submitted
            ids.extend(job.ids[start:stop])
        return ids

    def finish(self, pieces: list[Piece], logits: np.ndarray, seconds: float) -> None:
        """Hand each piece its rows of the batch's ``logits``; a request with all its rows is answered."""
        row = 0
        for job, start, stop in pieces:
            job.logits[start:stop] = logits[row : row + stop - start]
            row += stop - start
            job.inference_s += seconds
            job.batch_requests = max(job.batch_requests, len(pieces))
            job.remaining -= stop - start
            if job.remaining == 0:
                _settle(job)

    @staticmethod
    def fail(pieces: list[Piece], error: BaseException) -> None:
        """Every request of the batch fails with ``error``."""
        for job, _, _ in pieces:
            _settle(job, error)


def _settle(job: Job, error: BaseException | None = None) -> None:
    try:
        if error is None:
            job.future.set_result(job)
        else:
            job.future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled by its caller (timed out) meanwhile
        pass
