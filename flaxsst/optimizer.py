"""The recipe's optimizer: global-norm clipping, then AdamW (PyTorch's ``AdamW`` update) on
transformers' linear warmup/decay schedule."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from flaxsst.config import TrainSection


def linear_warmup_decay(learning_rate: float, warmup_steps: int, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """transformers' ``get_linear_schedule_with_warmup``: 0 -> lr over ``warmup_steps``, then linear to 0 at ``total_steps``."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(1, warmup_steps)
        decay = jnp.maximum(0.0, (total_steps - count) / max(1, total_steps - warmup_steps))
        return learning_rate * jnp.where(count < warmup_steps, warm, decay)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels and embeddings; not on biases or LayerNorm scales."""
    def keep(path, _):
        names = [str(getattr(p, "key", p)) for p in path]
        return names[-1] not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train: TrainSection, schedule: Callable[[jax.Array], jax.Array],
                   mask: Any = decay_mask) -> optax.GradientTransformation:
    """Clipping then AdamW at ``schedule``'s learning rate (the caller's ``linear_warmup_decay``, the
    one it also logs); ``mask`` says which parameters are weight-decayed (a tree of booleans, or a
    function of the parameters giving one)."""
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                    weight_decay=train.weight_decay, mask=mask),
    )
