"""The training loop: data, pmap steps, evaluation, checkpoints, logs, export.

``train_and_evaluate(config, workdir)`` runs the whole recipe. Rerunning it in the same workdir
resumes from the newest intact checkpoint, whatever moment the last run died at: batches are a pure
function of the step and the seed, dropout keys of the step, so a resumed run equals an
uninterrupted one bit for bit (``flaxsst.checkpoints`` says what keeps the workdir consistent).
SIGTERM or Ctrl-C finishes the step, saves a checkpoint and returns an unfinished result.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from flaxsst.checkpoints import (
    Checkpoints,
    WorkdirLock,
    check_resumable,
    rewind_metrics,
    write_config,
)
from flaxsst.config import ModelConfig, TrainConfig, parse_dtype
from flaxsst.convert import load_pretrained, save_pretrained
from flaxsst.data import host_rows, load_tokenized, make_batch, steps_per_epoch, synthetic_vocab, train_batch_indices
from flaxsst.errors import CheckpointError, ConfigError, FlaxsstError, Interrupted
from flaxsst.evaluation import check_sequence_length, eval_rows, evaluate, write_results
from flaxsst.metric_log import METRICS_FILE, Console, MetricLog, record_values
from flaxsst.metrics import format_table
from flaxsst.model import DistilBertForSequenceClassification, init_params
from flaxsst.parallel import DataParallel, maybe_initialize_distributed
from flaxsst.runtime import enable_compilation_cache, without_slow_compile_banner
from flaxsst.steps import create_train_state, linear_warmup_decay, make_layout, make_optimizer
from flaxsst.tokenizer import Tokenizer

logger = logging.getLogger("flaxsst")


class Diverged(FlaxsstError, FloatingPointError):
    """A NaN or inf loss or gradient norm; names the step and the last good checkpoint."""


# ---- set-up ---------------------------------------------------------------------------------

def build_tokenizer(config: TrainConfig, cache_dir: Path) -> Tokenizer:
    source = config.model.tokenizer or config.model.init
    key = "model.tokenizer" if config.model.tokenizer else "model.init"
    max_length = config.data.max_seq_length
    if source:
        path = Path(source).expanduser()
        if path.is_file():
            return Tokenizer.from_file(path, max_length)
        return Tokenizer.from_pretrained(source, max_length, key=key)
    if config.data.path != "synthetic":
        raise ConfigError("model.init and model.tokenizer are both empty: set one (a HF folder or hub id) to get a vocabulary")
    return Tokenizer.from_file(synthetic_vocab(cache_dir / "synthetic_vocab.txt"), max_length)


def build_model(config: TrainConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, dict]:
    """The starting weights: a HF checkpoint (``model.init``) or a random init of the configured size.
    What loading a checkpoint changed (a head initialised, tensors dropped or folded) is logged once."""
    section = config.model
    overrides = {k: v for k, v in (("dropout", section.dropout), ("attention_dropout", section.attention_dropout),
                                   ("seq_classif_dropout", section.seq_classif_dropout)) if v is not None}
    if section.labels:
        overrides["id2label"] = dict(enumerate(section.labels))
        overrides["label2id"] = None
    dtype = parse_dtype(section.dtype)
    if section.residual_dtype:
        overrides["residual_dtype"] = section.residual_dtype  # ModelConfig parses it
    if section.init:
        model_config, params, report = load_pretrained(section.init, dtype=dtype, rng=config.train.seed,
                                                       return_report=True, setting="model.init", **overrides)
        if report.initialized or report.dropped or report.folded:
            logger.info(report.summary())
        check_sequence_length(config, model_config, section.init)
        return model_config, params
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=section.dim, n_layers=section.n_layers,
                               n_heads=section.n_heads, hidden_dim=section.hidden_dim,
                               max_position_embeddings=section.max_position_embeddings, dtype=dtype, **overrides)
    check_sequence_length(config, model_config, "model.max_position_embeddings")
    return model_config, init_params(model_config, config.train.seed)


def check_devices(config: TrainConfig) -> None:
    """The global batch must split evenly over every device (checked before anything is loaded)."""
    n_devices = jax.device_count()
    if config.train.global_batch_size % n_devices:
        raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} does not divide evenly over "
                          f"{n_devices} devices; use a multiple of {n_devices}")


@dataclasses.dataclass
class Steps:
    """What runs on the devices: the model, how the state holds its parameters, the optimizer and
    schedule, and the train and eval programs mapped over the devices."""

    model: DistilBertForSequenceClassification
    layout: Any
    optimizer: Any
    schedule: Callable
    parallel: DataParallel
    train: Callable
    eval: Callable


def build_steps(config: TrainConfig, model_config: ModelConfig, params: Any, total_steps: int,
                devices: list | None = None) -> Steps:
    """The steps a run of ``config`` uses; ``params`` may be shapes (``jax.ShapeDtypeStruct``) and
    ``devices`` the devices of a TPU slice that is not there (``flaxsst.aot``)."""
    schedule = linear_warmup_decay(config.train.learning_rate, config.train.warmup_steps, total_steps)
    layout = make_layout(config.train.param_layout, params, model_config.dtype, model_config.n_layers)
    optimizer = make_optimizer(config.train, total_steps, layout)
    model = DistilBertForSequenceClassification(model_config, scan_layers=layout.scan)
    parallel = DataParallel(config.train.parallel, devices)
    return Steps(model, layout, optimizer, schedule, parallel,
                 parallel.train_step(model, optimizer, schedule, layout=layout), parallel.eval_step(model, layout))


# ---- the loop ---------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    step: int
    finished: bool
    best_accuracy: float | None
    eval_metrics: dict | None
    export_dir: Path | None
    params: Any = None  # the last step's params (numpy)
    compile_seconds: float = 0.0  # compiling every train/eval shape, before the first step
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

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        for _ in steps:
            item = slots.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Trainer:
    """One training run in ``workdir``; ``run()`` trains (resuming if it can), evaluates and exports."""

    def __init__(self, config: TrainConfig, workdir: str | os.PathLike,
                 on_step: Callable[["Trainer", int], None] | None = None):
        self.config = config
        self.workdir = Path(workdir)
        self.on_step = on_step
        self.stop_requested = False
        self.in_loop = False

    def request_stop(self, *_: Any) -> None:
        """Finish the current step, save a checkpoint and return (SIGTERM / Ctrl-C); before the
        loop there is nothing to save and the run ends at once."""
        if not self.in_loop:
            raise Interrupted("interrupted before the first step; nothing was trained, rerun the same command")
        self.stop_requested = True

    def run(self) -> TrainResult:
        maybe_initialize_distributed(self.config)
        enable_compilation_cache()
        # Process-wide: keys are raw uint32 arrays, read with the default implementation.
        jax.config.update("jax_default_prng_impl", self.config.train.prng_impl)
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
        check_devices(config)
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", config.train.keep_checkpoints, self.is_main)
        if self.is_main:
            self.checkpoints.remove_leftovers()
            if self.checkpoints.committed_steps():
                check_resumable(self.workdir, config)
        resume_step = self.checkpoints.latest_intact()  # before anything heavy: all damaged is an error
        if self.is_main:
            write_config(self.workdir, config)
        self._setup()
        start, meta = self._resume(resume_step)
        if self.is_main:  # a fresh start keeps nothing of a run that died before its first checkpoint
            rewind_metrics(self.workdir / METRICS_FILE, start if resume_step is not None else -1)
        self.log = MetricLog(self.workdir, self.is_main, start)
        if resume_step is None:
            self.log.write("run", 0, {"total_steps": self.total_steps, "end_step": self.end_step,
                                      "steps_per_epoch": self.steps_per_epoch, "warmup_steps": config.train.warmup_steps,
                                      "learning_rate": config.train.learning_rate})
        compile_seconds = self._compile_all() if config.train.precompile else 0.0
        self.console = Console(start, self.end_step, self.is_main)
        try:
            finished, train_seconds, eval_metrics = self._loop(start, meta)
            self.console.close()
            if not finished:
                return TrainResult(meta["step"], False, meta["best_accuracy"], eval_metrics, None, self._host_params(),
                                   compile_seconds, train_seconds)
            export_dir, final = self._export(meta)
        finally:
            self.console.close()
            self.log.close()
        return TrainResult(self.end_step, True, meta["best_accuracy"], final, export_dir, self._host_params(),
                           compile_seconds, train_seconds)

    def _setup(self) -> None:
        config = self.config
        self.cache_dir = Path(config.data.cache_dir or self.workdir / "cache")
        self.tokenizer = build_tokenizer(config, self.cache_dir)
        self.model_config, params = build_model(config, self.tokenizer)
        label2id = self.model_config.label2id
        seed = config.train.seed
        self.train_split = load_tokenized(config.data, config.data.train_split, self.tokenizer, label2id, self.cache_dir, seed)
        self.eval_split = load_tokenized(config.data, config.data.eval_split, self.tokenizer, label2id, self.cache_dir, seed)
        self.steps_per_epoch = steps_per_epoch(len(self.train_split), config.train.global_batch_size)
        self.total_steps = math.ceil(config.train.num_epochs * self.steps_per_epoch)
        self.end_step = min(self.total_steps, config.train.max_steps) if config.train.max_steps > 0 else self.total_steps
        steps = build_steps(config, self.model_config, params, self.total_steps)
        self.layout, self.parallel, self.p_train, self.p_eval = steps.layout, steps.parallel, steps.train, steps.eval
        self.initial_state = create_train_state(self.layout.pack(params), steps.optimizer, seed)

    def _resume(self, step: int | None) -> tuple[int, dict]:
        """Checkpoint ``step``'s step and meta, its state placed on the devices; or (no checkpoint)
        step 0 and a fresh state."""
        meta = {"step": 0, "best_accuracy": None, "best_step": None}
        state = self.initial_state
        if step is not None:
            restored, meta = self.checkpoints.restore(step, jax.device_get(state))
            state = jax.tree_util.tree_map(np.asarray, restored)
            logger.info("resuming from %s at step %d", self.checkpoints.path(step), step)
        self.last_good = str(self.checkpoints.path(step)) if step is not None else None
        del self.initial_state
        self.pstate = self.parallel.put_state(state)
        return int(meta["step"]), meta

    def _batch(self, step: int) -> dict:
        config = self.config
        indices = train_batch_indices(step, len(self.train_split), config.train.global_batch_size, config.train.seed)
        batch = make_batch(self.train_split, indices, config.train.global_batch_size, config.data.length_buckets,
                           config.data.max_seq_length, self.tokenizer.pad_id)
        return self.parallel.put_batch(host_rows(batch, jax.process_index(), jax.process_count()))

    def _is_eval_step(self, step: int) -> bool:
        every = self.config.train.eval_every_steps
        return step == self.end_step or (every > 0 and step % every == 0) or (every <= 0 and step % self.steps_per_epoch == 0)

    def _loop(self, start: int, meta: dict) -> tuple[bool, float, dict | None]:
        """Steps ``start`` .. ``end_step``; -> (finished, seconds in steps, the last eval's metrics)."""
        config = self.config
        window = {"loss": 0.0, "accuracy": 0.0, "examples": 0.0, "t0": time.perf_counter()}
        eval_metrics, pending = None, None  # pending: (step, metrics on device), read one step behind
        side_seconds, loop_start = 0.0, time.perf_counter()
        self.in_loop = True
        try:
            for step, batch in zip(range(start, self.end_step), _prefetch(self._batch, range(start, self.end_step))):
                self.pstate, metrics = self.p_train(self.pstate, batch)
                if pending is not None:
                    self._account(pending, window)
                pending = (step + 1, metrics)
                done = step + 1
                if self.on_step is not None:
                    self.on_step(self, done)
                if self._is_eval_step(done) or self.stop_requested or done % config.train.checkpoint_every_steps == 0:
                    self._account(pending, window)
                    pending = None
                    side_start = time.perf_counter()
                    if self._is_eval_step(done):
                        eval_metrics = self._evaluate(done, meta)
                    meta.update(step=done, epoch=done / self.steps_per_epoch)
                    path = self.checkpoints.save(done, self.parallel.get(self.pstate), meta, protect=[meta["best_step"]])
                    self.last_good = str(path)
                    side_seconds += time.perf_counter() - side_start
                if self.stop_requested:
                    self.console.write(f"interrupted: checkpoint saved at step {done} in {self.last_good}; "
                                       "rerun the same command to resume")
                    return False, time.perf_counter() - loop_start - side_seconds, eval_metrics
            if pending is not None:
                self._account(pending, window)
        finally:
            self.in_loop = False
        return True, time.perf_counter() - loop_start - side_seconds, eval_metrics

    def _account(self, pending: tuple[int, Any], window: dict) -> None:
        """Read a step's metrics (one step behind the device), stop on NaN, log every ``log_every_steps``."""
        step, metrics = pending
        values = {k: float(np.asarray(v).reshape(())) for k, v in self.parallel.get(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise Diverged(f"loss {values['loss']}, gradient norm {values['grad_norm']} at step {step}; last good "
                           f"checkpoint: {self.last_good or 'none (no checkpoint yet)'}; lower train.learning_rate "
                           "or check the data, then rerun")
        window["loss"] += values["loss"] * values["examples"]
        window["accuracy"] += values["accuracy"] * values["examples"]
        window["examples"] += values["examples"]
        self.console.step()
        if step % self.config.train.log_every_steps == 0 or step == self.end_step:
            elapsed = time.perf_counter() - window["t0"]
            record = {
                "loss": window["loss"] / window["examples"],
                "accuracy": window["accuracy"] / window["examples"],
                "learning_rate": values["learning_rate"],
                "grad_norm": values["grad_norm"],
                "examples_per_sec": window["examples"] / max(elapsed, 1e-9),
                "epoch": step / self.steps_per_epoch,
            }
            self.log.write("train", step, record)
            self.console.log(step, record)
            window.update(loss=0.0, accuracy=0.0, examples=0.0, t0=time.perf_counter())

    def _evaluate(self, step: int, meta: dict) -> dict:
        """Dev metrics now; the best step so far is remembered in ``meta`` (its checkpoint is kept)."""
        metrics = evaluate(self.parallel, self.p_eval, self.pstate.params, self.eval_split, self.model_config,
                           self.config, self.tokenizer.pad_id)
        best = meta["best_accuracy"] is None or metrics["accuracy"] > meta["best_accuracy"]
        if best:
            meta.update(best_accuracy=metrics["accuracy"], best_step=step)
        self.log.write("eval", step, record_values(metrics))
        self.console.evaluation(step, step / self.steps_per_epoch, metrics, best)
        return metrics

    def _host_params(self) -> Any:
        """The current parameters as the model's tree of numpy arrays (whatever the layout)."""
        return self.layout.unpack(self.parallel.get(self.pstate.params))

    def _export(self, meta: dict) -> tuple[Path | None, dict]:
        """The best checkpoint (by dev accuracy) in HF layout, its ``eval_results.json`` and the curves."""
        best_step = meta["best_step"]
        problem = self.checkpoints.verify(best_step)
        if problem is not None:
            raise CheckpointError(f"the best checkpoint {self.checkpoints.path(best_step)} is damaged ({problem}); "
                                  "it cannot be exported")
        restored, _ = self.checkpoints.restore(best_step, self.parallel.get(self.pstate))
        params = self.layout.unpack(restored.params)
        final = evaluate(self.parallel, self.p_eval, self.parallel.put_state(self.layout.pack(params)), self.eval_split,
                         self.model_config, self.config, self.tokenizer.pad_id)
        if not self.is_main:
            return None, final
        export_dir = save_pretrained(self.workdir / "export", self.model_config, params, tokenizer=self.tokenizer)
        write_results(self.workdir / "eval_results.json", final, split=self.eval_split.source, step=best_step,
                      checkpoint=str(self.checkpoints.path(best_step)))
        print(f"{self.eval_split.source}: the exported checkpoint, step {best_step} "
              f"(epoch {best_step / self.steps_per_epoch:.2f}, the best dev accuracy of the run)")
        print(format_table(final, self.model_config.id2label))
        from flaxsst.plot import plot_workdir

        plot_workdir(self.workdir)
        return export_dir, final

    def _compile_all(self) -> float:
        """Compile the train and eval programs of every bucket length at once, in threads (XLA
        compiles outside the GIL; one process only), by running each on a throwaway copy of the
        state with batches of weight 0. -> seconds taken."""
        from concurrent.futures import ThreadPoolExecutor

        config = self.config
        lengths = sorted(set(config.data.length_buckets) | {config.data.max_seq_length})
        train_rows = config.train.global_batch_size // jax.process_count()
        eval_rows_here = eval_rows(config.train.eval_batch_size) // jax.process_count()
        host_state = self.parallel.get(self.pstate)

        def dummy(rows: int, length: int) -> dict:
            zeros = np.zeros((rows, length), np.int32)
            return self.parallel.put_batch({"input_ids": zeros, "attention_mask": zeros + 1,
                                            "labels": np.zeros(rows, np.int32), "weights": np.zeros(rows, np.float32)})

        def train_program(length: int) -> None:
            _, metrics = self.p_train(self.parallel.put_state(host_state), dummy(train_rows, length))
            jax.block_until_ready(metrics)

        def eval_program(length: int) -> None:
            jax.block_until_ready(self.p_eval(self.pstate.params, dummy(eval_rows_here, length)))

        if self.is_main:
            logger.info("compiling %d programs (train and eval at lengths %s); later runs read them from the "
                        "compilation cache", 2 * len(lengths), ", ".join(map(str, lengths)))
        start = time.perf_counter()
        # Across processes every collective (the programs' psums, device_put's cross-process check) must
        # be issued in the same order everywhere, so there the programs compile one after another.
        workers = 2 * len(lengths) if jax.process_count() == 1 else 1
        with without_slow_compile_banner(), ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(train_program, n) for n in lengths] + [pool.submit(eval_program, n) for n in lengths]
            for future in futures:
                future.result()
        seconds = time.perf_counter() - start
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
