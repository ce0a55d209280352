"""Model configuration with Hugging Face ``config.json`` field names.

``ModelConfig`` reads and writes a DistilBERT ``config.json`` exactly as
transformers lays it out (``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``,
``id2label`` ...). Keys it does not model are kept in ``extra`` and written back,
so a config survives a round trip through flaxsst unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def parse_dtype(value: Any) -> Any:
    """``"bf16"`` / ``"bfloat16"`` / ``jnp.bfloat16`` -> ``jnp.bfloat16`` (and likewise fp32, fp16)."""
    if isinstance(value, str):
        try:
            return _DTYPES[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}"
            ) from None
    return jnp.dtype(value).type


def dtype_name(value: Any) -> str:
    return jnp.dtype(value).name


@dataclasses.dataclass
class ModelConfig:
    """DistilBERT hyper-parameters, named as in Hugging Face's ``DistilBertConfig``.

    ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype of the
    parameters; neither is written to ``config.json`` (HF records only
    ``torch_dtype``, the dtype the weights are stored in).
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    id2label: dict[int, str] = dataclasses.field(
        default_factory=lambda: {0: "NEGATIVE", 1: "POSITIVE"}
    )
    label2id: dict[str, int] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        self.dtype = parse_dtype(self.dtype)
        self.param_dtype = parse_dtype(self.param_dtype)
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim={self.dim} must be divisible by n_heads={self.n_heads}"
            )
        if self.activation not in ("gelu", "relu"):
            raise ValueError(
                f"activation={self.activation!r} is not supported; expected 'gelu' or 'relu'"
            )
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(
                f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}"
            )

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- config.json --------------------------------------------------------------
    _NON_JSON = ("extra", "dtype", "param_dtype")

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict of a ``DistilBertForSequenceClassification``."""
        out: dict[str, Any] = dict(self.extra)
        for field in dataclasses.fields(self):
            if field.name not in self._NON_JSON:
                out[field.name] = getattr(self, field.name)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = "distilbert"
        out["architectures"] = ["DistilBertForSequenceClassification"]
        out["torch_dtype"] = "float32"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._NON_JSON)
        known = {k: v for k, v in data.items() if k in names}
        extra = {
            k: v
            for k, v in data.items()
            if k not in names and k not in ("model_type", "architectures", "torch_dtype", "dtype")
        }
        if "num_labels" in extra and "id2label" not in known:
            known["id2label"] = {i: f"LABEL_{i}" for i in range(int(extra.pop("num_labels")))}
        extra.pop("num_labels", None)
        return cls(**known, extra=extra, **overrides)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data, **overrides)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
