"""The training step that the multi-host test runs in one process and in two."""

import numpy as np

from flaxsst.config import ModelConfig, TrainSection
from flaxsst.data import TokenizedSplit, make_batch, process_slice
from flaxsst.model import DistilBertForSequenceClassification, init_params
from flaxsst.optimizer import linear_warmup_decay, make_optimizer
from flaxsst.param_groups import ParamGroups
from flaxsst.parallel import pmap_train_step, put_batch, replicate, unreplicate
from flaxsst.steps import create_train_state

GLOBAL_BATCH = 8


def one_step(process_index: int, process_count: int, devices=None):
    """One train step on this process's rows of a fixed global batch (6 real rows of 8); -> (params, examples)."""
    config = ModelConfig(vocab_size=60, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32,
                         dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    rng = np.random.default_rng(0)
    split = TokenizedSplit("train", "fixed", [rng.integers(5, 60, int(n)).astype(np.int32) for n in rng.integers(3, 12, 6)],
                           rng.integers(0, 2, 6).astype(np.int32))
    batch = make_batch(split, np.arange(6), GLOBAL_BATCH, [16], 16)
    train = TrainSection(learning_rate=1e-2, warmup_steps=0)
    params = init_params(config, 3)
    groups = ParamGroups(params)
    schedule = linear_warmup_decay(train.learning_rate, 0, 10)
    optimizer = make_optimizer(train, schedule, groups.decay_mask())
    step = pmap_train_step(DistilBertForSequenceClassification(config), groups, optimizer, schedule, devices)
    state = replicate(create_train_state(groups.pack(params), optimizer, seed=0), devices)
    state, metrics = step(state, put_batch(process_slice(batch, process_index, process_count), devices))
    return groups.unpack(unreplicate(state.params)), float(unreplicate(metrics)["examples"])


TINY_RUN = ["data.synthetic_train_size=200", "data.synthetic_eval_size=60", "train.num_epochs=1",
            "train.checkpoint_every_steps=3", "train.log_every_steps=2", "train.eval_batch_size=16"]


def tiny_training_run(workdir: str):
    """conf/tiny.yaml, 7 steps (ragged last batch), checkpoints every 3 steps; -> TrainResult."""
    from pathlib import Path

    from flaxsst.config import load_train_config
    from flaxsst.trainer import Trainer

    config = load_train_config(Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml",
                               TINY_RUN)
    return Trainer(config, workdir).run()
