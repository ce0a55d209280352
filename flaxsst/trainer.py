"""The training loop: data, steps on every device, evaluation, checkpoints, logs, export.

``train_and_evaluate(config, workdir)`` runs the whole recipe. Rerunning it in the same workdir
resumes from the newest intact checkpoint, whatever moment the last run died at: batches are a pure
function of the step and the seed, dropout keys of the step, so a resumed run equals an
uninterrupted one bit for bit (``flaxsst.checkpoints`` keeps the workdir consistent). SIGTERM or
Ctrl-C finishes the step, saves a checkpoint and returns an unfinished result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from flaxsst.checkpoints import Checkpoints, WorkdirLock, check_resumable, rewind_metrics, write_config
from flaxsst.config import ModelConfig, TrainConfig
from flaxsst.convert import load_pretrained, save_pretrained
from flaxsst.data import (
    check_distinct_splits,
    eval_lengths,
    load_tokenized,
    make_batch,
    process_slice,
    steps_per_epoch,
    synthetic_vocab,
    train_batch_indices,
    train_lengths,
)
from flaxsst.errors import CheckpointError, ConfigError, FlaxsstError, Interrupted
from flaxsst.evaluation import check_sequence_length, describe_split, evaluate, global_eval_batch, write_results
from flaxsst.metric_log import METRICS_FILE, Console, MetricLog, record_values
from flaxsst.metrics import format_table
from flaxsst.model import DistilBertForSequenceClassification, init_params, precision_of
from flaxsst.optimizer import linear_warmup_decay, make_optimizer
from flaxsst.param_groups import ParamGroups
from flaxsst.parallel import (
    check_divisible,
    initialize_distributed,
    pmap_eval_step,
    pmap_train_step,
    put_batch,
    replicate,
    unreplicate,
)
from flaxsst.paths import output_folder
from flaxsst.runtime import enable_compilation_cache, without_slow_compile_banner
from flaxsst.steps import TrainState, create_train_state
from flaxsst.tokenizer import Tokenizer

logger = logging.getLogger("flaxsst")


class Diverged(FlaxsstError, FloatingPointError):
    """A NaN or inf loss or gradient norm; names the step and the last good checkpoint."""


# ---- what a run is made of ------------------------------------------------------------------

def build_tokenizer(config: TrainConfig, cache_dir: Path) -> Tokenizer:
    source = config.model.tokenizer or config.model.pretrained
    key = "model.tokenizer" if config.model.tokenizer else "model.pretrained"
    max_length = config.data.max_seq_length
    if source:
        path = Path(source).expanduser()
        if path.is_file():
            return Tokenizer.from_file(path, max_length)
        return Tokenizer.from_pretrained(source, max_length, key=key)
    if config.data.path != "synthetic":
        raise ConfigError("model.pretrained and model.tokenizer are both empty: set one (a HF folder or hub id) "
                          "to get a vocabulary")
    return Tokenizer.from_file(synthetic_vocab(cache_dir / "synthetic_vocab.txt"), max_length)


def model_overrides(config: TrainConfig) -> dict:
    """The config.json fields the run sets: ``model.config``, and ``model.labels`` as id2label."""
    overrides = dict(config.model.config)
    if config.model.labels:
        overrides.update(id2label=dict(enumerate(config.model.labels)), label2id=None)
    return overrides


def build_model(config: TrainConfig, tokenizer: Tokenizer, report: bool = True) -> tuple[ModelConfig, dict]:
    """The starting weights: a HF checkpoint (``model.pretrained``) or a random init of ``model.config``'s
    shape. What loading a checkpoint changed (a head initialised, tensors dropped or folded) is logged
    where ``report`` (a resumed run replaces these weights with its checkpoint's: no report)."""
    pretrained = config.model.pretrained
    if pretrained:
        model_config, params, load_report = load_pretrained(pretrained, rng=config.train.seed, return_report=True,
                                                            setting="model.pretrained", **model_overrides(config))
        if report and (load_report.initialized or load_report.dropped or load_report.folded):
            logger.info(load_report.summary())
        check_sequence_length(config, model_config, pretrained)
        return model_config, params
    model_config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, **model_overrides(config)})
    check_sequence_length(config, model_config, "model.config.max_position_embeddings")
    return model_config, init_params(model_config, config.train.seed)


@dataclasses.dataclass
class Steps:
    """What runs on the devices: the model, the parameter groups the state holds, the optimizer and
    its schedule, and the train and eval steps mapped over the devices."""

    model: DistilBertForSequenceClassification
    groups: ParamGroups
    optimizer: Any
    schedule: Callable
    train: Callable
    eval: Callable


def build_steps(config: TrainConfig, model_config: ModelConfig, params: Any, total_steps: int,
                devices: list | None = None) -> Steps:
    """The steps a run of ``config`` uses; ``params`` may be shapes (``jax.ShapeDtypeStruct``) and
    ``devices`` the devices of a TPU slice that is not there (``flaxsst.aot``)."""
    precision = precision_of(config)
    model = DistilBertForSequenceClassification(model_config, precision)
    groups = ParamGroups(params, precision.dtype)
    optimizer = make_optimizer(config.train, total_steps, groups.decay_mask())
    schedule = linear_warmup_decay(config.train.learning_rate, config.train.warmup_steps, total_steps)
    return Steps(model, groups, optimizer, schedule, pmap_train_step(model, groups, optimizer, schedule, devices),
                 pmap_eval_step(model, groups, devices))


def _in_a_callback(frame: Any) -> bool:
    """Whether ``frame`` runs inside a garbage collector callback or a ``__del__``, where Python
    drops exceptions (JAX frees buffers from such a callback)."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


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


# ---- the run ----------------------------------------------------------------------------------

class Trainer:
    """One training run in ``workdir``; ``run()`` trains (resuming if it can), evaluates and exports.
    ``on_step(trainer, step)`` is called after each step (tests use it to interrupt or poison a run)."""

    def __init__(self, config: TrainConfig, workdir: str | os.PathLike,
                 on_step: Callable[["Trainer", int], None] | None = None):
        self.config = config
        self.workdir_arg = workdir  # as given: "" is refused, not taken for the current folder
        self.workdir = Path(workdir)
        self.on_step = on_step
        self.stop_requested = False
        self.in_loop = False
        self.trained = False  # the loop reached the last step: what is left is the final evaluation and export

    def request_stop(self, signum: int = 0, frame: Any = None) -> None:
        """Finish the current step, save a checkpoint and return (SIGTERM / Ctrl-C); outside the
        loop the run ends at once. The request is also remembered, and ``_check_stop`` ends the run
        at the next phase: Python drops (and prints) an exception raised while it runs a callback of
        its own, so none is raised there."""
        self.stop_requested = True
        if not self.in_loop and not _in_a_callback(frame):
            raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        if self.trained:
            return Interrupted(f"interrupted after the last step; its checkpoint is saved in {self.last_good}, "
                               "rerun the same command to evaluate and export it")
        return Interrupted("interrupted before the first step; nothing was trained, rerun the same command")

    def _check_stop(self) -> None:
        """Outside the loop, end the run if a stop was requested (its exception may have been dropped)."""
        if self.stop_requested and not self.in_loop:
            raise self._interrupted()

    def run(self) -> TrainResult:
        initialize_distributed(self.config)
        output_folder(self.workdir_arg, "--workdir")
        enable_compilation_cache()
        self.is_main = jax.process_index() == 0
        lock = WorkdirLock(self.workdir) if self.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            with self._signal_handlers():
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> TrainResult:
        config = self.config
        check_divisible(config.train.global_batch_size, jax.device_count(), "train.global_batch_size")
        check_distinct_splits(config.data)
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", config.train.keep_checkpoints, self.is_main)
        if self.is_main:
            self.checkpoints.remove_leftovers()
            if self.checkpoints.committed_steps():
                check_resumable(self.workdir, config)
        resume_step = self.checkpoints.latest_intact()  # before anything heavy: every checkpoint damaged is an error
        if self.is_main:
            write_config(self.workdir, config)
        initial_state = self._prepare(resuming=resume_step is not None)
        self._check_stop()
        if self.is_main:
            self._warn_about_the_schedule()
        start, meta = self._resume(resume_step, initial_state)
        self._check_stop()
        if start > self.end_step and self.is_main:
            logger.info("the checkpoint's step %d is past this run's last step %d (train.max_steps=%d, %g epochs): "
                        "nothing to train; its best step is exported", start, self.end_step,
                        config.train.max_steps, config.train.num_epochs)
        if self.is_main:  # a fresh start keeps nothing of a run that died before its first checkpoint
            rewind_metrics(self.workdir / METRICS_FILE, start if resume_step is not None else -1)
        self.log = MetricLog(self.workdir, self.is_main, start)
        if resume_step is None:
            self.log.write("run", 0, {"total_steps": self.total_steps, "end_step": self.end_step,
                                      "steps_per_epoch": self.steps_per_epoch, "warmup_steps": config.train.warmup_steps,
                                      "learning_rate": config.train.learning_rate})
        compile_seconds = self._compile(start)
        self._check_stop()
        self.console = Console(start, self.end_step, self.is_main)
        try:
            finished, train_seconds, eval_metrics = self._loop(start, meta)
            self.console.close()
            if finished:
                self.trained = True
                self._check_stop()
                export_dir, eval_metrics = self._export(meta["best_step"])
        finally:
            self.console.close()
            self.log.close()
        if not finished:
            return TrainResult(meta["step"], False, meta["best_accuracy"], eval_metrics, None, self._host_params(),
                               compile_seconds, train_seconds)
        return TrainResult(max(start, self.end_step), True, meta["best_accuracy"], eval_metrics, export_dir,
                           self._host_params(), compile_seconds, train_seconds)

    def _prepare(self, resuming: bool = False) -> TrainState:
        """Tokenizer, model, data, schedule and steps; -> the fresh state on the host (a resumed run
        replaces it with its checkpoint's)."""
        config = self.config
        cache_dir = Path(config.data.cache_dir or self.workdir / "cache")
        self.tokenizer = build_tokenizer(config, cache_dir)
        self.model_config, params = build_model(config, self.tokenizer, report=not resuming)
        splits = [load_tokenized(config.data, split, self.tokenizer, self.model_config.label2id, cache_dir,
                                 config.train.seed) for split in (config.data.train_split, config.data.eval_split)]
        self.train_split, self.eval_split = splits
        if self.is_main:
            logger.info("training on %d examples from %s; evaluating on %s", len(self.train_split),
                        self.train_split.source, describe_split(self.eval_split))
        self.steps_per_epoch = steps_per_epoch(len(self.train_split), config.train.global_batch_size)
        self.total_steps = math.ceil(config.train.num_epochs * self.steps_per_epoch)
        self.end_step = min(self.total_steps, config.train.max_steps) if config.train.max_steps > 0 else self.total_steps
        self.steps = build_steps(config, self.model_config, params, self.total_steps)
        self.train = Programs(self.steps.train)
        self.eval = Programs(self.steps.eval)
        return create_train_state(self.steps.groups.pack(params), self.steps.optimizer, config.train.seed)

    def _warn_about_the_schedule(self) -> None:
        """One warning where the run stops short of what its schedule was built for: a warmup as long
        as the schedule, ``train.max_steps`` inside the warmup, or before half of the schedule."""
        train = self.config.train
        last_rate = float(self.steps.schedule(max(self.end_step - 1, 0)))
        if train.warmup_steps >= self.total_steps:
            logger.warning("train.warmup_steps=%d is not shorter than the schedule's %d steps: the learning rate "
                           "never reaches train.learning_rate=%g", train.warmup_steps, self.total_steps,
                           train.learning_rate)
        elif self.end_step < train.warmup_steps:
            logger.warning("train.max_steps=%d stops the run inside its %d-step warmup: the learning rate stops at "
                           "%.3g, below its peak train.learning_rate=%g; raise train.max_steps past the warmup or "
                           "lower train.warmup_steps", train.max_steps, train.warmup_steps, last_rate,
                           train.learning_rate)
        elif self.end_step < self.total_steps / 2:
            logger.warning("train.max_steps=%d stops the run at step %d of the schedule's %d (train.num_epochs=%g): "
                           "the learning rate stops at %.3g, still %.0f%% of its peak; to train a shorter schedule, "
                           "lower train.num_epochs instead", train.max_steps, self.end_step, self.total_steps,
                           train.num_epochs, last_rate, 100 * last_rate / train.learning_rate)

    def _resume(self, step: int | None, initial_state: TrainState) -> tuple[int, dict]:
        """Checkpoint ``step``'s state on the devices and its meta; or (no checkpoint) the fresh state."""
        meta = {"step": 0, "best_accuracy": None, "best_step": None}
        state = jax.device_get(initial_state)
        if step is not None:
            state, meta = self.checkpoints.restore(step, state)
            logger.info("resuming from %s at step %d of %d: the weights, optimizer state and best step saved there",
                        self.checkpoints.path(step), step, self.end_step)
        self.last_good = str(self.checkpoints.path(step)) if step is not None else None
        self.state = replicate(state)
        return int(meta["step"]), meta

    def _batch(self, step: int) -> dict:
        config = self.config
        indices = train_batch_indices(step, len(self.train_split), config.train.global_batch_size, config.train.seed)
        batch = make_batch(self.train_split, indices, config.train.global_batch_size, config.data.length_buckets,
                           config.data.max_seq_length, self.tokenizer.pad_id)
        return put_batch(process_slice(batch, jax.process_index(), jax.process_count()))

    def _is_eval_step(self, step: int) -> bool:
        every = self.config.train.eval_every_steps
        return step == self.end_step or (every > 0 and step % every == 0) or (every <= 0 and step % self.steps_per_epoch == 0)

    def _loop(self, start: int, meta: dict) -> tuple[bool, float, dict | None]:
        """Steps ``start`` .. ``end_step``; -> (finished, seconds in steps, the last evaluation's metrics).
        Step N+1 is dispatched before step N's metrics are read, so the host never stalls the devices."""
        config = self.config
        window = {"loss": 0.0, "accuracy": 0.0, "examples": 0.0, "t0": time.perf_counter()}
        eval_metrics, pending = None, None  # pending: (step, its metrics on the devices)
        side_seconds, loop_start = 0.0, time.perf_counter()
        self.in_loop = True
        try:
            for step, batch in zip(range(start, self.end_step), _prefetch(self._batch, range(start, self.end_step))):
                self.state, metrics = self.train(self.state, batch)
                if pending is not None:
                    self._record(pending, window)
                pending = (step + 1, metrics)
                done = step + 1
                if self.on_step is not None:
                    self.on_step(self, done)
                if self._is_eval_step(done) or self.stop_requested or done % config.train.checkpoint_every_steps == 0:
                    self._record(pending, window)
                    pending = None
                    side_start = time.perf_counter()
                    if self._is_eval_step(done):
                        eval_metrics = self._evaluate(done, meta)
                    meta.update(step=done, epoch=done / self.steps_per_epoch)
                    path = self.checkpoints.save(done, unreplicate(self.state), meta, protect=[meta["best_step"]])
                    self.last_good = str(path)
                    side_seconds += time.perf_counter() - side_start
                if self.stop_requested:
                    self.console.write(f"interrupted: checkpoint saved at step {done} in {self.last_good}; "
                                       "rerun the same command to resume")
                    return False, time.perf_counter() - loop_start - side_seconds, eval_metrics
            if pending is not None:
                self._record(pending, window)
        finally:
            self.in_loop = False
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
        if step % self.config.train.log_every_steps == 0 or step == self.end_step:
            record = {
                "loss": window["loss"] / window["examples"],
                "accuracy": window["accuracy"] / window["examples"],
                "learning_rate": values["learning_rate"],
                "grad_norm": values["grad_norm"],
                "examples_per_sec": window["examples"] / max(time.perf_counter() - window["t0"], 1e-9),
                "epoch": step / self.steps_per_epoch,
            }
            self.log.write("train", step, record)
            self.console.log(step, record)
            window.update(loss=0.0, accuracy=0.0, examples=0.0, t0=time.perf_counter())

    def _evaluate(self, step: int, meta: dict) -> dict:
        """Dev metrics now; the best step so far is remembered in ``meta`` (its checkpoint is kept)."""
        metrics = evaluate(self.eval, self.state.params, self.eval_split, self.model_config, self.config,
                           self.tokenizer.pad_id)
        best = meta["best_accuracy"] is None or metrics["accuracy"] > meta["best_accuracy"]
        if best:
            meta.update(best_accuracy=metrics["accuracy"], best_step=step)
        self.log.write("eval", step, record_values(metrics))
        self.console.evaluation(step, step / self.steps_per_epoch, metrics, best)
        return metrics

    def _host_params(self) -> Any:
        """The current parameters as the model's tree of numpy arrays."""
        return self.steps.groups.unpack(unreplicate(self.state.params))

    def _export(self, best_step: int) -> tuple[Path | None, dict]:
        """The best checkpoint (by dev accuracy) in HF layout, its ``eval_results.json`` and the curves."""
        problem = self.checkpoints.verify(best_step)
        if problem is not None:
            raise CheckpointError(f"the best checkpoint {self.checkpoints.path(best_step)} is damaged ({problem}); "
                                  "it cannot be exported")
        restored, _ = self.checkpoints.restore(best_step, unreplicate(self.state))
        final = evaluate(self.eval, replicate(restored.params), self.eval_split, self.model_config, self.config,
                         self.tokenizer.pad_id)
        if not self.is_main:
            return None, final
        params = self.steps.groups.unpack(restored.params)
        export_dir = save_pretrained(self.workdir / "export", self.model_config, params, tokenizer=self.tokenizer)
        write_results(self.workdir / "eval_results.json", final, self.eval_split, step=best_step,
                      checkpoint=str(self.checkpoints.path(best_step)))
        print(f"{describe_split(self.eval_split)}: the exported checkpoint, step {best_step} "
              f"(epoch {best_step / self.steps_per_epoch:.2f}, the best dev accuracy of the run)")
        print(format_table(final, self.model_config.id2label))
        from flaxsst.plot import plot_workdir

        plot_workdir(self.workdir)
        return export_dir, final

    def _compile(self, start: int) -> float:
        """Compile, ahead of time and in threads (XLA compiles outside the GIL), the train program of
        every padded length the remaining batches take and the eval program of every length the
        evaluation takes; -> seconds. With ``train.precompile=false`` programs compile on first use."""
        from concurrent.futures import ThreadPoolExecutor, wait

        config = self.config
        if not config.train.precompile or start >= self.end_step:
            return 0.0
        if jax.process_count() > 1:  # a compiled multi-process pmap takes global arrays, not each host's rows
            if self.is_main:
                logger.info("compiling each program on its first use (%d processes)", jax.process_count())
            return 0.0
        buckets, longest = config.data.length_buckets, config.data.max_seq_length
        train = train_lengths(self.train_split, range(start, self.end_step), config.train.global_batch_size,
                              config.train.seed, buckets, longest)
        eval_rows = global_eval_batch(config.train.eval_batch_size)
        evaluation = eval_lengths(self.eval_split, eval_rows, buckets, longest)
        n = jax.local_device_count()

        def shape(rows: int, length: int) -> dict:
            ids = jax.ShapeDtypeStruct((n, rows // n, length), np.int32)
            return {"input_ids": ids, "attention_mask": ids, "labels": jax.ShapeDtypeStruct(ids.shape[:2], np.int32),
                    "weights": jax.ShapeDtypeStruct(ids.shape[:2], np.float32)}

        jobs = [(self.train, length, self.state, shape(config.train.global_batch_size, length)) for length in train]
        jobs += [(self.eval, length, self.state.params, shape(eval_rows, length)) for length in evaluation]
        if self.is_main:
            cached = "; later runs read them from the compilation cache" if getattr(jax.config, "jax_compilation_cache_dir", None) else ""
            logger.info("compiling %d programs (train at lengths %s, evaluation at %s)%s", len(jobs),
                        ", ".join(map(str, train)), ", ".join(map(str, evaluation)), cached)
        start_time = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=len(jobs))
        try:
            with without_slow_compile_banner():
                futures = [pool.submit(programs.compile, length, *args) for programs, length, *args in jobs]
                while not wait(futures, timeout=0.25).done.issuperset(futures):
                    self._check_stop()
                for future in futures:
                    future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on a stop, the programs being compiled finish alone
        seconds = time.perf_counter() - start_time
        if self.is_main:
            logger.info("compiled in %.1f s", seconds)
        return seconds

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> TrainResult:
    return Trainer(config, workdir).run()
