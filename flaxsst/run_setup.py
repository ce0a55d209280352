"""What a training run is made of, built before its first step: the tokenizer, the model's config and
starting weights, the data, the schedule's length and the steps on the devices (``RunSetup``).
``flaxsst.aot`` builds the same steps from shapes alone, for a TPU slice that is not there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

from flaxsst.compile_steps import Programs
from flaxsst.config import ModelConfig, TrainConfig, check_sequence_length
from flaxsst.convert import read_pretrained
from flaxsst.data import TokenizedSplit, load_tokenized, steps_per_epoch, synthetic_vocab
from flaxsst.errors import ConfigError
from flaxsst.evaluation import describe_split
from flaxsst.hub import resolve_model_dir
from flaxsst.model import DistilBertForSequenceClassification, init_params, precision_of
from flaxsst.optimizer import linear_warmup_decay, make_optimizer
from flaxsst.param_groups import ParamGroups
from flaxsst.parallel import pmap_eval_step, pmap_train_step
from flaxsst.steps import TrainState, create_train_state
from flaxsst.tokenizer import Tokenizer
from flaxsst.workdir import Workdir

logger = logging.getLogger("flaxsst")


def pretrained_folder(config: TrainConfig) -> Path | None:
    """``model.pretrained`` as a local folder (a hub id fetched or found in the hub's cache), once for
    the weights and the tokenizer; None for a random init."""
    return resolve_model_dir(config.model.pretrained, key="model.pretrained") if config.model.pretrained else None


def build_tokenizer(config: TrainConfig, cache_dir: Path, pretrained: Path | None = None) -> Tokenizer:
    """``model.tokenizer``, else the tokenizer of ``pretrained`` (``pretrained_folder``), else the synthetic
    data's vocabulary."""
    max_length = config.data.max_seq_length
    if not config.model.tokenizer and pretrained is not None:
        return Tokenizer.from_folder(pretrained, max_length)
    source = config.model.tokenizer or config.model.pretrained
    key = "model.tokenizer" if config.model.tokenizer else "model.pretrained"
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


def build_model(config: TrainConfig, tokenizer: Tokenizer, report: bool = True,
                pretrained: Path | None = None) -> tuple[ModelConfig, dict]:
    """The starting weights: a HF checkpoint (``model.pretrained``, resolved as ``pretrained`` where given)
    or a random init of ``model.config``'s shape. What loading a checkpoint changed (a head initialised,
    tensors dropped or folded) is logged where ``report`` (a resumed run replaces these weights with its
    checkpoint's: no report)."""
    if config.model.pretrained:
        folder = pretrained if pretrained is not None else pretrained_folder(config)
        model_config, params, load_report = read_pretrained(folder, rng=config.train.seed, return_report=True,
                                                            **model_overrides(config))
        if report and (load_report.initialized or load_report.dropped or load_report.folded):
            logger.info(load_report.summary())
        check_sequence_length(config, model_config, config.model.pretrained)
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
    ``devices`` the devices of a TPU slice that is not there (``flaxsst.aot``). The schedule is built
    here, once: the optimizer steps with it, the train step logs it and the trainer warns from it."""
    precision = precision_of(config)
    model = DistilBertForSequenceClassification(model_config, precision)
    groups = ParamGroups(params, precision.dtype)
    schedule = linear_warmup_decay(config.train.learning_rate, config.train.warmup_steps, total_steps)
    optimizer = make_optimizer(config.train, schedule, groups.decay_mask())
    return Steps(model, groups, optimizer, schedule, pmap_train_step(model, groups, optimizer, schedule, devices),
                 pmap_eval_step(model, groups, devices))


@dataclasses.dataclass
class RunSetup:
    """What a run of a config is made of, ready for its first step."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    train_split: TokenizedSplit
    eval_split: TokenizedSplit
    steps_per_epoch: int
    total_steps: int  # the schedule's length: train.num_epochs of steps
    end_step: int  # where this run stops: the schedule's end, or train.max_steps where that is sooner
    steps: Steps
    train: Programs  # steps.train, compiled per padded length
    eval: Programs  # steps.eval, likewise


def prepare_run(config: TrainConfig, workdir: Workdir, is_main: bool,
                resuming: bool = False) -> tuple[RunSetup, TrainState]:
    """Tokenizer, model, data, schedule and steps; -> the run's setup and its fresh state on the host (a
    resumed run replaces that with its checkpoint's, and reports no loading of the starting weights)."""
    cache_dir = Path(config.data.cache_dir or workdir.cache)
    pretrained = pretrained_folder(config)
    tokenizer = build_tokenizer(config, cache_dir, pretrained)
    model_config, params = build_model(config, tokenizer, report=not resuming, pretrained=pretrained)
    train_split, eval_split = [
        load_tokenized(config.data, split, tokenizer, model_config.label2id, cache_dir, config.train.seed)
        for split in (config.data.train_split, config.data.eval_split)]
    if is_main:
        logger.info("training on %d examples from %s; evaluating on %s", len(train_split), train_split.source,
                    describe_split(eval_split))
    per_epoch = steps_per_epoch(len(train_split), config.train.global_batch_size)
    total_steps = math.ceil(config.train.num_epochs * per_epoch)
    end_step = min(total_steps, config.train.max_steps) if config.train.max_steps > 0 else total_steps
    steps = build_steps(config, model_config, params, total_steps)
    setup = RunSetup(tokenizer, model_config, train_split, eval_split, per_epoch, total_steps, end_step, steps,
              Programs(steps.train), Programs(steps.eval))
    return setup, create_train_state(steps.groups.pack(params), steps.optimizer, config.train.seed)


def warn_about_the_schedule(config: TrainConfig, setup: RunSetup) -> None:
    """One warning where the run stops short of what its schedule was built for: a warmup as long
    as the schedule, ``train.max_steps`` inside the warmup, or before half of the schedule."""
    train, end_step, total_steps = config.train, setup.end_step, setup.total_steps
    last_rate = float(setup.steps.schedule(max(end_step - 1, 0)))
    if train.warmup_steps >= total_steps:
        logger.warning("train.warmup_steps=%d is not shorter than the schedule's %d steps: the learning rate "
                       "never reaches train.learning_rate=%g", train.warmup_steps, total_steps, train.learning_rate)
    elif end_step < train.warmup_steps:
        logger.warning("train.max_steps=%d stops the run inside its %d-step warmup: the learning rate stops at "
                       "%.3g, below its peak train.learning_rate=%g; raise train.max_steps past the warmup or "
                       "lower train.warmup_steps", train.max_steps, train.warmup_steps, last_rate, train.learning_rate)
    elif end_step < total_steps / 2:
        logger.warning("train.max_steps=%d stops the run at step %d of the schedule's %d (train.num_epochs=%g): "
                       "the learning rate stops at %.3g, still %.0f%% of its peak; to train a shorter schedule, "
                       "lower train.num_epochs instead", train.max_steps, end_step, total_steps,
                       train.num_epochs, last_rate, 100 * last_rate / train.learning_rate)
