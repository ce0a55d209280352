"""The training loop: data, pmap steps, evaluation, orbax checkpoints, logs, export.

``train_and_evaluate(config, workdir)`` runs the whole recipe; rerunning it in the
same workdir resumes from the latest checkpoint (batches are a pure function of
the step and the seed, dropout keys of the step, so a resumed run equals an
uninterrupted one bit for bit). SIGTERM or Ctrl-C saves a checkpoint and returns.
"""

from __future__ import annotations

import dataclasses
import json
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

from flaxsst.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    parse_dtype,
    train_config_to_yaml,
)
from flaxsst.convert import load_pretrained, save_pretrained
from flaxsst.data import (
    TokenizedSplit,
    eval_index_batches,
    host_rows,
    load_tokenized,
    make_batch,
    steps_per_epoch,
    synthetic_vocab,
    train_batch_indices,
)
from flaxsst.metrics import classification_metrics, format_table
from flaxsst.model import DistilBertForSequenceClassification, init_params
from flaxsst.predict import enable_compilation_cache
from flaxsst.steps import (
    DataParallel,
    create_train_state,
    linear_warmup_decay,
    make_layout,
    make_optimizer,
)
from flaxsst.tokenizer import Tokenizer

logger = logging.getLogger("flaxsst")


# ---- set-up ---------------------------------------------------------------------------------

def maybe_initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` when the config or ``JAX_COORDINATOR_ADDRESS`` asks for it."""
    dist = config.distributed
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (dist.enabled or address):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if address:
        kwargs = dict(
            coordinator_address=address,
            num_processes=int(os.environ.get("JAX_NUM_PROCESSES", dist.num_processes)),
            process_id=int(os.environ.get("JAX_PROCESS_ID", dist.process_id)),
        )
    jax.distributed.initialize(**kwargs)  # with no arguments JAX detects TPU pods, SLURM, Open MPI


def build_tokenizer(config: TrainConfig, cache_dir: Path) -> Tokenizer:
    source = config.model.tokenizer or config.model.init
    max_length = config.data.max_seq_length
    if source:
        path = Path(source).expanduser()
        if path.is_file():
            return Tokenizer.from_file(path, max_length)
        return Tokenizer.from_pretrained(source, max_length)
    if config.data.path != "synthetic":
        raise ValueError("model.init and model.tokenizer are both empty: set one (a HF folder or hub id) to get a vocabulary")
    return Tokenizer.from_file(synthetic_vocab(cache_dir / "synthetic_vocab.txt"), max_length)


def build_model(config: TrainConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, dict]:
    """The starting weights: a HF checkpoint (``model.init``) or a random init of the configured size."""
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
                                                       return_report=True, **overrides)
        logger.info(report.summary())
        return model_config, params
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=section.dim, n_layers=section.n_layers,
                               n_heads=section.n_heads, hidden_dim=section.hidden_dim,
                               max_position_embeddings=max(512, config.data.max_seq_length), dtype=dtype, **overrides)
    return model_config, init_params(model_config, config.train.seed)


# ---- checkpoints ------------------------------------------------------------------------------

class Checkpoints:
    """Orbax ``CheckpointManager`` of train state + JSON metadata; orbax writes each step to a
    temporary folder and renames it when complete, so a crash mid-save leaves no checkpoint that
    looks finished."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> Path:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                          force=True)
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, template: Any) -> tuple[Any, dict]:
        ocp = self._ocp
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                                      meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()


# ---- logging ----------------------------------------------------------------------------------

class MetricLog:
    """``metrics.jsonl`` and TensorBoard events; only process 0 writes."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- evaluation -------------------------------------------------------------------------------

def eval_rows(batch_size: int) -> int:
    """Rows of a global eval batch: ``batch_size`` rounded down to a multiple of the device count."""
    n_devices = jax.device_count()
    return max(n_devices, batch_size // n_devices * n_devices)


def predict_split(parallel: DataParallel, p_eval: Callable, params: Any, split: TokenizedSplit, batch_size: int,
                  buckets, max_seq_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and per-example loss of every example of ``split``, each counted exactly once."""
    rows = eval_rows(batch_size)
    all_logits, all_losses = [], []
    for indices in eval_index_batches(len(split), rows):
        batch = host_rows(make_batch(split, indices, rows, buckets, max_seq_length, pad_id),
                          jax.process_index(), jax.process_count())
        out = p_eval(params, parallel.put_batch(batch))
        all_logits.append(parallel.rows(out["logits"])[: len(indices)])
        all_losses.append(parallel.rows(out["loss"])[: len(indices)])
    return np.concatenate(all_logits), np.concatenate(all_losses)


def evaluate(parallel: DataParallel, p_eval: Callable, params: Any, split: TokenizedSplit, model_config: ModelConfig,
             config: TrainConfig, pad_id: int) -> dict:
    logits, _ = predict_split(parallel, p_eval, params, split, config.train.eval_batch_size, config.data.length_buckets,
                              config.data.max_seq_length, pad_id)
    return classification_metrics(split.labels, logits, model_config.num_labels)


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
        maybe_initialize_distributed(config)
        enable_compilation_cache()
        # Process-wide: keys are raw uint32 arrays, read with the default implementation.
        jax.config.update("jax_default_prng_impl", config.train.prng_impl)
        self.config = config
        self.workdir = Path(workdir)
        self.on_step = on_step
        self.stop_requested = False
        self.is_main = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(config.data.cache_dir or self.workdir / "cache")
        if self.is_main:
            (self.workdir / "config.yaml").write_text(train_config_to_yaml(config), encoding="utf-8")

    def request_stop(self, *_: Any) -> None:
        """Finish the current step, save a checkpoint and return (SIGTERM / Ctrl-C)."""
        self.stop_requested = True

    def _setup(self) -> None:
        config = self.config
        n_global = jax.device_count()
        if config.train.global_batch_size % n_global:
            raise ValueError(
                f"train.global_batch_size={config.train.global_batch_size} does not divide evenly over {n_global} "
                f"devices; use a multiple of {n_global}"
            )
        self.tokenizer = build_tokenizer(config, self.cache_dir)
        self.model_config, params = build_model(config, self.tokenizer)
        label2id = self.model_config.label2id
        seed = config.train.seed
        self.train_split = load_tokenized(config.data, config.data.train_split, self.tokenizer, label2id, self.cache_dir, seed)
        self.eval_split = load_tokenized(config.data, config.data.eval_split, self.tokenizer, label2id, self.cache_dir, seed)
        self.steps_per_epoch = steps_per_epoch(len(self.train_split), config.train.global_batch_size)
        self.total_steps = math.ceil(config.train.num_epochs * self.steps_per_epoch)
        self.end_step = min(self.total_steps, config.train.max_steps) if config.train.max_steps > 0 else self.total_steps
        self.schedule = linear_warmup_decay(config.train.learning_rate, config.train.warmup_steps, self.total_steps)
        self.layout = make_layout(config.train.param_layout, params, self.model_config.dtype)
        self.optimizer = make_optimizer(config.train, self.total_steps, self.layout)
        self.model = DistilBertForSequenceClassification(self.model_config)
        self.state = create_train_state(self.layout.pack(params), self.optimizer, seed)
        self.parallel = DataParallel(config.train.parallel)
        self.p_train = self.parallel.train_step(self.model, self.optimizer, self.schedule, layout=self.layout)
        self.p_eval = self.parallel.eval_step(self.model, self.layout)
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", config.train.keep_checkpoints)
        self.best = Checkpoints(self.workdir / "checkpoints" / "best", 1)
        self.log = MetricLog(self.workdir, self.is_main)

    def _batch(self, step: int) -> dict:
        config = self.config
        indices = train_batch_indices(step, len(self.train_split), config.train.global_batch_size, config.train.seed)
        batch = make_batch(self.train_split, indices, config.train.global_batch_size, config.data.length_buckets,
                           config.data.max_seq_length, self.tokenizer.pad_id)
        return self.parallel.put_batch(host_rows(batch, jax.process_index(), jax.process_count()))

    def _is_eval_step(self, step: int) -> bool:
        every = self.config.train.eval_every_steps
        return step == self.end_step or (every > 0 and step % every == 0) or (every <= 0 and step % self.steps_per_epoch == 0)

    def _save(self, step: int, meta: dict) -> Path:
        return self.checkpoints.save(step, self.parallel.get(self.pstate), meta)

    def run(self) -> TrainResult:
        self._setup()
        config = self.config
        start, meta = 0, {"best_accuracy": None, "best_step": None, "param_layout": self.layout.name}
        latest = self.checkpoints.latest_step()
        if latest is not None:
            saved_layout = self.checkpoints.read_meta(latest).get("param_layout", "tree")
            if saved_layout != self.layout.name:
                raise ConfigError(
                    f"{self.checkpoints.directory / str(latest)} holds train.param_layout={saved_layout} state; this run asks "
                    f"for train.param_layout={self.layout.name}: rerun with train.param_layout={saved_layout} or use a new workdir"
                )
            restored, meta = self.checkpoints.restore(latest, jax.device_get(self.state))
            meta.setdefault("param_layout", self.layout.name)
            self.state = jax.tree_util.tree_map(np.asarray, restored)
            start = int(self.state.step)
            logger.info("resuming from %s at step %d", self.checkpoints.directory / str(latest), start)
        self.pstate = self.parallel.put_state(self.state)
        del self.state
        compile_seconds = self._compile_all() if config.train.precompile else 0.0
        self.side_seconds = 0.0  # evaluation and checkpointing inside the loop
        last_checkpoint = str(self.checkpoints.directory / str(latest)) if latest is not None else None
        previous_signals = self._install_signal_handlers()
        progress = self._progress(start)
        window = {"loss": 0.0, "accuracy": 0.0, "examples": 0.0, "t0": time.perf_counter()}
        eval_metrics = None
        pending = None  # (step, metrics on device): read one step behind so the host never stalls the device
        loop_start = time.perf_counter()
        try:
            for step, batch in zip(range(start, self.end_step), _prefetch(self._batch, range(start, self.end_step))):
                self.pstate, metrics = self.p_train(self.pstate, batch)
                if pending is not None:
                    self._account(pending, window, progress, last_checkpoint)
                pending = (step + 1, metrics)
                done = step + 1
                if self.on_step is not None:
                    self.on_step(self, done)
                if self._is_eval_step(done) or self.stop_requested or done % config.train.checkpoint_every_steps == 0:
                    self._account(pending, window, progress, last_checkpoint)
                    pending = None
                    side_start = time.perf_counter()
                    if self._is_eval_step(done):
                        eval_metrics = self._evaluate(done, meta)
                    meta.update(step=done, epoch=done / self.steps_per_epoch,
                                position_in_epoch=done % self.steps_per_epoch)
                    last_checkpoint = str(self._save(done, meta))
                    self.side_seconds += time.perf_counter() - side_start
                if self.stop_requested:
                    if self.is_main:
                        progress.write(f"interrupted: checkpoint saved at step {done} in {last_checkpoint}; "
                                       f"rerun the same command to resume")
                    return TrainResult(done, False, meta["best_accuracy"], eval_metrics, None,
                                       self._host_params(), compile_seconds,
                                       time.perf_counter() - loop_start - self.side_seconds)
            if pending is not None:
                self._account(pending, window, progress, last_checkpoint)
            train_seconds = time.perf_counter() - loop_start - self.side_seconds
        finally:
            progress.close()
            self._restore_signal_handlers(previous_signals)
        export_dir, final = self._export(meta)
        self.checkpoints.close()
        self.best.close()
        self.log.close()
        return TrainResult(self.end_step, True, meta["best_accuracy"], final or eval_metrics, export_dir,
                           self._host_params(), compile_seconds, train_seconds)

    def _host_params(self) -> Any:
        """The current parameters as the model's tree of numpy arrays (whatever the layout)."""
        return self.layout.unpack(self.parallel.get(self.pstate.params))

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

        start = time.perf_counter()
        # Across processes every collective (the programs' psums, device_put's cross-process check) must
        # be issued in the same order everywhere, so there the programs compile one after another.
        workers = 2 * len(lengths) if jax.process_count() == 1 else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(train_program, n) for n in lengths] + [pool.submit(eval_program, n) for n in lengths]
            for future in futures:
                future.result()
        seconds = time.perf_counter() - start
        logger.info("compiled %d train and %d eval programs (lengths %s) in %.1f s", len(lengths), len(lengths), lengths, seconds)
        return seconds

    def _progress(self, start: int):
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (logs stay readable)
        return tqdm(total=self.end_step, initial=start, desc="train", unit="step", disable=None if self.is_main else True,
                    dynamic_ncols=True)

    def _account(self, pending, window: dict, progress, last_checkpoint) -> None:
        step, metrics = pending
        values = {k: float(np.asarray(v).reshape(())) for k, v in self.parallel.get(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"loss is {values['loss']} at step {step}; last good checkpoint: {last_checkpoint or 'none (no checkpoint yet)'}"
            )
        window["loss"] += values["loss"] * values["examples"]
        window["accuracy"] += values["accuracy"] * values["examples"]
        window["examples"] += values["examples"]
        progress.update(1)
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
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                                 ex_s=f"{record['examples_per_sec']:.0f}")
            window.update(loss=0.0, accuracy=0.0, examples=0.0, t0=time.perf_counter())

    def _evaluate(self, step: int, meta: dict) -> dict:
        metrics = evaluate(self.parallel, self.p_eval, self.pstate.params, self.eval_split, self.model_config, self.config, self.tokenizer.pad_id)
        self.log.write("eval", step, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
        if meta["best_accuracy"] is None or metrics["accuracy"] > meta["best_accuracy"]:
            meta.update(best_accuracy=metrics["accuracy"], best_step=step)
            self.best.save(step, {"params": self._host_params()}, {"step": step, **metrics})
        return metrics

    def _export(self, meta: dict) -> tuple[Path | None, dict | None]:
        """Export the best checkpoint in HF layout, write its ``eval_results.json`` and the curves PNG."""
        best_step = self.best.latest_step()
        params = self._host_params()
        if best_step is not None:
            params = self.best.restore(best_step, {"params": params})[0]["params"]
        final = evaluate(self.parallel, self.p_eval, self.parallel.put_state(self.layout.pack(params)), self.eval_split,
                         self.model_config, self.config, self.tokenizer.pad_id)
        if not self.is_main:
            return None, final
        export_dir = save_pretrained(self.workdir / "export", self.model_config, params, tokenizer=self.tokenizer)
        results = {**final, "split": self.eval_split.source, "step": best_step if best_step is not None else self.end_step}
        (self.workdir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(format_table(final, self.model_config.id2label))
        from flaxsst.plot import plot_workdir

        plot_workdir(self.workdir)
        return export_dir, final

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        return {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> TrainResult:
    return Trainer(config, workdir).run()


def evaluate_pretrained(model: str, config: TrainConfig, output: str | os.PathLike | None = None) -> dict:
    """Evaluate a HF folder / hub id / export on ``config.data.eval_split`` over all devices;
    print the table and write ``eval_results.json`` to ``output``."""
    maybe_initialize_distributed(config)
    model_config, params = load_pretrained(model, dtype=parse_dtype(config.model.dtype))
    tokenizer = Tokenizer.from_pretrained(model, config.data.max_seq_length)
    cache_dir = Path(config.data.cache_dir or Path(output or ".") / "cache")
    split = load_tokenized(config.data, config.data.eval_split, tokenizer, model_config.label2id, cache_dir, config.train.seed)
    parallel = DataParallel(config.train.parallel)
    p_eval = parallel.eval_step(DistilBertForSequenceClassification(model_config))
    metrics = evaluate(parallel, p_eval, parallel.put_state(params), split, model_config, config, tokenizer.pad_id)
    if jax.process_index() == 0:
        print(f"{split.source}: {len(split)} examples, model {model}")
        print(format_table(metrics, model_config.id2label))
        if output is not None:
            Path(output).mkdir(parents=True, exist_ok=True)
            results = {**metrics, "split": split.source, "model": str(model)}
            (Path(output) / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return metrics
