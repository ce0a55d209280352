"""A run's train and eval programs compiled before its first step, one per padded length its batches
take, so no step waits on XLA mid-run and a program that cannot compile fails before training starts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import numpy as np

from flaxsst.config import TrainConfig
from flaxsst.data import eval_lengths, train_lengths
from flaxsst.evaluation import global_eval_batch
from flaxsst.runtime import without_slow_compile_banner

logger = logging.getLogger("flaxsst")


class Programs:
    """A pmapped step and its programs compiled ahead of time, one per padded length; a call takes
    the program of its batch's length (or compiles on first use)."""

    def __init__(self, step: Callable):
        self.step = step
        self.compiled: dict[int, Callable] = {}

    def compile(self, length: int, *args: Any) -> None:
        self.compiled[length] = self.step.lower(*args).compile()

    def __call__(self, state_or_params: Any, batch: dict) -> Any:
        return self.compiled.get(batch["input_ids"].shape[-1], self.step)(state_or_params, batch)


def compile_ahead(config: TrainConfig, setup: Any, state: Any, start: int, is_main: bool,
                  check_stop: Callable[[], None]) -> float:
    """Compile, in threads (XLA compiles outside the GIL), the train program of every padded length
    the batches of steps ``start`` .. ``setup.end_step`` take (``setup``: the run's
    ``flaxsst.run_setup.RunSetup``) and the eval program of every length the
    evaluation takes; -> seconds. ``check_stop`` is called while they compile, to end the run on a
    stop request. With ``train.precompile=false`` programs compile on first use."""
    from concurrent.futures import ThreadPoolExecutor, wait

    if not config.train.precompile or start >= setup.end_step:
        return 0.0
    if jax.process_count() > 1:  # a compiled multi-process pmap takes global arrays, not each host's rows
        if is_main:
            logger.info("compiling each program on its first use (%d processes)", jax.process_count())
        return 0.0
    buckets, longest = config.data.length_buckets, config.data.max_seq_length
    train = train_lengths(setup.train_split, range(start, setup.end_step), config.train.global_batch_size,
                          config.train.seed, buckets, longest)
    eval_rows = global_eval_batch(config.train.eval_batch_size)
    evaluation = eval_lengths(setup.eval_split, eval_rows, buckets, longest)
    n = jax.local_device_count()

    def shape(rows: int, length: int) -> dict:
        ids = jax.ShapeDtypeStruct((n, rows // n, length), np.int32)
        return {"input_ids": ids, "attention_mask": ids, "labels": jax.ShapeDtypeStruct(ids.shape[:2], np.int32),
                "weights": jax.ShapeDtypeStruct(ids.shape[:2], np.float32)}

    jobs = [(setup.train, length, state, shape(config.train.global_batch_size, length)) for length in train]
    jobs += [(setup.eval, length, state.params, shape(eval_rows, length)) for length in evaluation]
    if is_main:
        cached = "; later runs read them from the compilation cache" if getattr(jax.config, "jax_compilation_cache_dir", None) else ""
        logger.info("compiling %d programs (train at lengths %s, evaluation at %s)%s", len(jobs),
                    ", ".join(map(str, train)), ", ".join(map(str, evaluation)), cached)
    start_time = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=len(jobs))
    try:
        with without_slow_compile_banner():
            futures = [pool.submit(programs.compile, length, *args) for programs, length, *args in jobs]
            while not wait(futures, timeout=0.25).done.issuperset(futures):
                check_stop()
            for future in futures:
                future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on a stop, the programs being compiled finish alone
    seconds = time.perf_counter() - start_time
    if is_main:
        logger.info("compiled in %.1f s", seconds)
    return seconds
