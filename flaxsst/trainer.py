"""The training loop: data, steps on every device, evaluation, checkpoints, logs, export.

``train_and_evaluate(config, workdir)`` runs the whole recipe. Rerunning it in the same workdir
resumes from the newest intact checkpoint, whatever moment the last run died at: batches are a pure
function of the step and the seed, dropout keys of the step, so a resumed run equals an
uninterrupted one bit for bit (``flaxsst.checkpoints`` keeps the workdir consistent). SIGTERM or
Ctrl-C finishes the step, saves a checkpoint and returns an unfinished result (``flaxsst.stopping``).
What a run is made of is built by ``flaxsst.run_setup``, its programs compiled by
``flaxsst.compile_steps``, its best checkpoint exported by ``flaxsst.export``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from flaxsst import signals
from flaxsst.checkpoints import Checkpoints, WorkdirLock, check_resumable, rewind_metrics, write_config
from flaxsst.compile_steps import compile_ahead
from flaxsst.config import TrainConfig
from flaxsst.data import check_distinct_splits, make_batch, process_slice, train_batch_indices
from flaxsst.errors import FlaxsstError
from flaxsst.evaluation import evaluate
from flaxsst.export import export_best
from flaxsst.metric_log import Console, MetricLog, record_values
from flaxsst.parallel import check_divisible, initialize_distributed, put_batch, replicate, unreplicate
from flaxsst.paths import output_folder
from flaxsst.run_setup import RunSetup, prepare_run, warn_about_the_schedule
from flaxsst.runtime import enable_compilation_cache
from flaxsst.steps import TrainState
from flaxsst.stopping import StopRequest
from flaxsst.workdir import Workdir

logger = logging.getLogger("flaxsst")


class Diverged(FlaxsstError, FloatingPointError):
    """A NaN or inf loss or gradient norm; names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    step: int
    finished: bool
    best_accuracy: float | None
    eval_metrics: dict | None
    export_dir: Path | None
    params: Any = None  # the last step's parameters (the model's tree, numpy)
    compile_seconds: float = 0.0  # compiling the run's programs, before the first step
    train_seconds: float = 0.0  # the step loop, evaluation and checkpoint saves excluded


def _prefetch(make: Callable[[int], Any], steps: range, depth: int = 3) -> Iterator[Any]:
    """Build the batches of ``steps`` in a thread, ``depth`` ahead of the loop."""
    import queue

    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for step in steps:
                if stop.is_set():
                    return
                slots.put(make(step))
        except BaseException as e:  # surfaced in the consumer
            slots.put(e)

    threading.Thread(target=worker, daemon=True).start()
    try:
        for _ in steps:
            item = slots.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def train_batch(config: TrainConfig, setup: RunSetup, step: int) -> dict:
    """This process's rows of step ``step``'s batch (a pure function of the step and the seed), on its devices."""
    split = setup.train_split
    indices = train_batch_indices(step, len(split), config.train.global_batch_size, config.train.seed)
    batch = make_batch(split, indices, config.train.global_batch_size, config.data.length_buckets,
                       config.data.max_seq_length, setup.tokenizer.pad_id)
    return put_batch(process_slice(batch, jax.process_index(), jax.process_count()))


class Trainer:
    """One training run in ``workdir``; ``run()`` trains (resuming if it can), evaluates and exports.
    ``on_step(trainer, step)`` is called after each step (tests use it to interrupt or poison a run)."""

    def __init__(self, config: TrainConfig, workdir: str | os.PathLike,
                 on_step: Callable[["Trainer", int], None] | None = None):
        self.config = config
        self.workdir_arg = workdir  # as given: "" is refused, not taken for the current folder
        self.workdir = Workdir(workdir)
        self.on_step = on_step
        self.stop = StopRequest()
        self.last_good: str | None = None  # the newest checkpoint this run resumed from or saved

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self.stop.requested = value

    def request_stop(self, signum: int = 0, frame: Any = None) -> None:
        """Finish the current step, save a checkpoint and return (SIGTERM / Ctrl-C); outside the
        loop the run ends at once (``flaxsst.stopping``)."""
        self.stop.request(signum, frame)

    def run(self) -> TrainResult:
        initialize_distributed(self.config)
        output_folder(self.workdir_arg, "--workdir")
        enable_compilation_cache()
        self.is_main = jax.process_index() == 0
        lock = WorkdirLock(self.workdir.root) if self.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            with signals.handling(self.request_stop):
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> TrainResult:
        config, workdir = self.config, self.workdir
        check_divisible(config.train.global_batch_size, jax.device_count(), "train.global_batch_size")
        check_distinct_splits(config.data)
        self.checkpoints = Checkpoints(workdir.checkpoints, config.train.keep_checkpoints, self.is_main)
        if self.is_main:
            self.checkpoints.remove_leftovers()
            if self.checkpoints.committed_steps():
                check_resumable(workdir.root, config)
        resume_step = self.checkpoints.latest_intact()  # before anything heavy: every checkpoint damaged is an error
        if self.is_main:
            write_config(workdir.root, config)
        initial_state = self._prepare(resuming=resume_step is not None)
        self.stop.check()
        setup = self.setup
        if self.is_main:
            warn_about_the_schedule(config, setup)
        start, meta = self._resume(resume_step, initial_state)
        self.stop.check()
        if start > setup.end_step and self.is_main:
            logger.info("the checkpoint's step %d is past this run's last step %d (train.max_steps=%d, %g epochs): "
                        "nothing to train; its best step is exported", start, setup.end_step,
                        config.train.max_steps, config.train.num_epochs)
        if self.is_main:  # a fresh start keeps nothing of a run that died before its first checkpoint
            rewind_metrics(workdir.metrics, start if resume_step is not None else -1)
        self.log = MetricLog(workdir.root, self.is_main, start)
        if resume_step is None:
            self.log.write("run", 0, {"total_steps": setup.total_steps, "end_step": setup.end_step,
                                      "steps_per_epoch": setup.steps_per_epoch,
                                      "warmup_steps": config.train.warmup_steps,
                                      "learning_rate": config.train.learning_rate})
        compile_seconds = compile_ahead(config, setup, self.state, start, self.is_main, self.stop.check)
        self.stop.check()
        self.console = Console(start, setup.end_step, self.is_main)
        try:
            finished, train_seconds, eval_metrics = self._loop(start, meta)
            self.console.close()
            if finished:
                self.stop.training_done(self.last_good)
                self.stop.check()
                export_dir, eval_metrics = self._export(meta["best_step"])
        finally:
            self.console.close()
            self.log.close()
        if not finished:
            return TrainResult(meta["step"], False, meta["best_accuracy"], eval_metrics, None, self._host_params(),
                               compile_seconds, train_seconds)
        return TrainResult(max(start, setup.end_step), True, meta["best_accuracy"], eval_metrics, export_dir,
                           self._host_params(), compile_seconds, train_seconds)

    def _prepare(self, resuming: bool = False) -> TrainState:
        """The run's parts (``run_setup.prepare_run``); -> the fresh state on the host (a resumed run
        replaces it with its checkpoint's)."""
        self.setup, initial_state = prepare_run(self.config, self.workdir, self.is_main, resuming)
        return initial_state

    def _resume(self, step: int | None, initial_state: TrainState) -> tuple[int, dict]:
        """Checkpoint ``step``'s state on the devices and its meta; or (no checkpoint) the fresh state."""
        meta = {"step": 0, "best_accuracy": None, "best_step": None}
        state = jax.device_get(initial_state)
        if step is not None:
            state, meta = self.checkpoints.restore(step, state)
            logger.info("resuming from %s at step %d of %d: the weights, optimizer state and best step saved there",
                        self.checkpoints.path(step), step, self.setup.end_step)
        self.last_good = str(self.checkpoints.path(step)) if step is not None else None
        self.state = replicate(state)
        return int(meta["step"]), meta

    def _is_eval_step(self, step: int) -> bool:
        every, setup = self.config.train.eval_every_steps, self.setup
        return step == setup.end_step or (every > 0 and step % every == 0) or (every <= 0 and step % setup.steps_per_epoch == 0)

    def _loop(self, start: int, meta: dict) -> tuple[bool, float, dict | None]:
        """Steps ``start`` .. ``end_step``; -> (finished, seconds in steps, the last evaluation's metrics).
        Step N+1 is dispatched before step N's metrics are read, so the host never stalls the devices."""
        config, setup = self.config, self.setup
        window = {"loss": 0.0, "accuracy": 0.0, "examples": 0.0, "t0": time.perf_counter()}
        eval_metrics, pending = None, None  # pending: (step, its metrics on the devices)
        side_seconds, loop_start = 0.0, time.perf_counter()
        self.stop.in_loop = True
        try:
            steps = range(start, setup.end_step)
            for step, batch in zip(steps, _prefetch(functools.partial(train_batch, self.config, setup), steps)):
                self.state, metrics = setup.train(self.state, batch)
                if pending is not None:
                    self._record(pending, window)
                pending = (step + 1, metrics)
                done = step + 1
                if self.on_step is not None:
                    self.on_step(self, done)
                if self._is_eval_step(done) or self.stop.requested or done % config.train.checkpoint_every_steps == 0:
                    self._record(pending, window)
                    pending = None
                    side_start = time.perf_counter()
                    if self._is_eval_step(done):
                        eval_metrics = self._evaluate(done, meta)
                    meta.update(step=done, epoch=done / setup.steps_per_epoch)
                    path = self.checkpoints.save(done, unreplicate(self.state), meta, protect=[meta["best_step"]])
                    self.last_good = str(path)
                    side_seconds += time.perf_counter() - side_start
                if self.stop.requested:
                    self.console.write(f"interrupted: checkpoint saved at step {done} in {self.last_good}; "
                                       "rerun the same command to resume")
                    return False, time.perf_counter() - loop_start - side_seconds, eval_metrics
            if pending is not None:
                self._record(pending, window)
        finally:
            self.stop.in_loop = False
        return True, time.perf_counter() - loop_start - side_seconds, eval_metrics

    def _record(self, pending: tuple[int, Any], window: dict) -> None:
        """Read a step's metrics, stop on NaN, and log every ``log_every_steps``."""
        step, metrics = pending
        values = {k: float(np.asarray(v).reshape(())) for k, v in unreplicate(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise Diverged(f"loss {values['loss']}, gradient norm {values['grad_norm']} at step {step}; last good "
                           f"checkpoint: {self.last_good or 'none (no checkpoint yet)'}; lower train.learning_rate "
                           "or check the data, then rerun")
        for key in ("loss", "accuracy"):
            window[key] += values[key] * values["examples"]
        window["examples"] += values["examples"]
        self.console.step()
        if step % self.config.train.log_every_steps == 0 or step == self.setup.end_step:
            record = {
                "loss": window["loss"] / window["examples"],
                "accuracy": window["accuracy"] / window["examples"],
                "learning_rate": values["learning_rate"],
                "grad_norm": values["grad_norm"],
                "examples_per_sec": window["examples"] / max(time.perf_counter() - window["t0"], 1e-9),
                "epoch": step / self.setup.steps_per_epoch,
            }
            self.log.write("train", step, record)
            self.console.log(step, record)
            window.update(loss=0.0, accuracy=0.0, examples=0.0, t0=time.perf_counter())

    def _evaluate(self, step: int, meta: dict) -> dict:
        """Dev metrics now; the best step so far is remembered in ``meta`` (its checkpoint is kept)."""
        setup = self.setup
        metrics = evaluate(setup.eval, self.state.params, setup.eval_split, setup.model_config, self.config,
                           setup.tokenizer.pad_id)
        best = meta["best_accuracy"] is None or metrics["accuracy"] > meta["best_accuracy"]
        if best:
            meta.update(best_accuracy=metrics["accuracy"], best_step=step)
        self.log.write("eval", step, record_values(metrics))
        self.console.evaluation(step, step / setup.steps_per_epoch, metrics, best)
        return metrics

    def _export(self, best_step: int) -> tuple[Path | None, dict]:
        """The best checkpoint in HF layout, its ``eval_results.json`` and the curves (``flaxsst.export``)."""
        return export_best(self.config, self.setup, self.checkpoints, unreplicate(self.state), best_step,
                           self.workdir, self.is_main)

    def _host_params(self) -> Any:
        """The current parameters as the model's tree of numpy arrays."""
        return self.setup.steps.groups.unpack(unreplicate(self.state.params))


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> TrainResult:
    return Trainer(config, workdir).run()
