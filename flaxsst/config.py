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
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from flaxsst.errors import ConfigError, yaml_error

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
            raise ConfigError(
                f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}"
            ) from None
    return jnp.dtype(value).type


def is_int8(value: Any) -> bool:
    """Whether a Classifier's ``dtype`` asks for int8 dense layers: ``"int8"`` (any case) or ``jnp.int8``."""
    if isinstance(value, str):
        return value.lower() == "int8"
    try:
        return jnp.dtype(value) == jnp.dtype(jnp.int8)
    except TypeError:
        return False


def parse_classifier_dtype(value: Any) -> Any:
    """A Classifier's ``dtype``: ``"int8"`` (``is_int8``), else ``parse_dtype``'s, whose error then names
    int8 among the choices."""
    if is_int8(value):
        return "int8"
    try:
        return parse_dtype(value)
    except ConfigError as e:
        raise ConfigError(f"{e}, or 'int8'") from None


@dataclasses.dataclass
class ModelConfig:
    """DistilBERT hyper-parameters: a ``config.json`` exactly as transformers lays out
    ``DistilBertConfig``. How the model computes (its dtypes) is not part of it: see
    ``flaxsst.model.Precision``."""

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
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # config.json keys it does not model, kept

    def __post_init__(self) -> None:
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.activation not in ("gelu", "relu"):
            raise ConfigError(f"activation={self.activation!r} is not supported; expected 'gelu' or 'relu'")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ConfigError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields(cls) -> list[str]:
        """The ``config.json`` keys it models."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict of a ``DistilBertForSequenceClassification``."""
        out: dict[str, Any] = dict(self.extra)
        out.update({name: getattr(self, name) for name in self.fields()})
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = "distilbert"
        out["architectures"] = ["DistilBertForSequenceClassification"]
        out["torch_dtype"] = "float32"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "ModelConfig":
        names = set(cls.fields())
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items()
                 if k not in names and k not in ("model_type", "architectures", "torch_dtype", "dtype")}
        if "num_labels" in extra and "id2label" not in known:
            known["id2label"] = {i: f"LABEL_{i}" for i in range(int(extra.pop("num_labels")))}
        extra.pop("num_labels", None)
        return cls(**{**known, **overrides}, extra=extra)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# ---- training configuration ---------------------------------------------------------------
# The defaults below only make the schema complete; the recipe's numbers live in conf/*.yaml.


ATTENTION_KINDS = ("auto", "xla")  # model.attention / Precision.attention
ATTENTION_CHOICES = " or ".join(map(repr, ATTENTION_KINDS))  # "'auto' or 'xla'", for the messages


@dataclasses.dataclass
class ModelSection:
    pretrained: str = ""  # HF folder or hub id to start from; "" = a random init of model.config's shape
    tokenizer: str = ""  # HF folder, hub id, vocab.txt or tokenizer.json; "" = pretrained's
    # config.json fields that override the pretrained model's (dropout: 0.0) or, for a random init,
    # DistilBERT-base's defaults (dim, n_layers, n_heads, hidden_dim, max_position_embeddings ...)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    labels: list[str] = dataclasses.field(default_factory=list)  # id2label in order; [] = the checkpoint's
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    residual_dtype: str = ""  # LayerNorm outputs / residual stream; "" = dtype, float32 = autocast-style bf16
    attention: str = "auto"  # auto: cuDNN / the TPU kernels where they apply; xla: the einsum path everywhere


@dataclasses.dataclass
class DataSection:
    path: str = "glue/sst2"  # a GLUE folder (train.tsv, dev.tsv), a file, "glue/sst2" or another hub data set, or "synthetic"
    train_split: str = "train"  # a split name, or a file
    eval_split: str = "validation"  # a split name, or a file (needed where data.path is the train file)
    text_column: str = "sentence"
    label_column: str = "label"
    max_seq_length: int = 128
    length_buckets: list[int] = dataclasses.field(default_factory=list)  # [] = pad every batch to max_seq_length
    synthetic_train_size: int = 2000
    synthetic_eval_size: int = 400
    cache_dir: str = ""  # tokenized splits; "" = <workdir>/cache for train.py, ~/.cache/flaxsst/tokens for evaluate.py


@dataclasses.dataclass
class TrainSection:
    learning_rate: float = 1e-5
    global_batch_size: int = 32
    warmup_steps: int = 0
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 stops after that many steps (the schedule still spans the epochs)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every_steps: int = 0  # 0 = at the end of every epoch
    eval_batch_size: int = 256
    log_every_steps: int = 50
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    precompile: bool = True  # compile every program the run needs before the first step, in parallel


@dataclasses.dataclass
class DistributedSection:
    enabled: bool = False  # or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)


# Keys of earlier versions, for the error that meets them in an old config or workdir.
RENAMED = {
    "model.init": "model.pretrained",
    **{f"model.{name}": f"model.config.{name}" for name in ("dim", "n_layers", "n_heads", "hidden_dim", "dropout",
                                                             "attention_dropout", "seq_classif_dropout",
                                                             "max_position_embeddings")},
    "train.parallel": None, "train.prng_impl": None, "train.param_layout": None,
}


def config_keys(section: Any = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the training config: ``model.pretrained`` ... ``distributed.process_id``."""
    keys = []
    for field in dataclasses.fields(section):
        if dataclasses.is_dataclass(field.default_factory if field.default_factory is not dataclasses.MISSING else None):
            keys += config_keys(field.default_factory, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def _suggest(name: str, names: list[str]) -> list[str]:
    """Names starting with ``name``, whose initials it is (``lr`` -> ``learning_rate``), or close to it."""
    import difflib

    picks = [n for n in names if name and (n.startswith(name) or "".join(w[0] for w in n.split("_")) == name)]
    return picks + [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in picks]


def _unknown_key_message(key: str) -> str:
    """``unknown key 'train.lr'; did you mean train.learning_rate? (train has: ...)``: close names,
    prefixes and initials of the keys in the same section, or the key's new name."""
    import difflib

    if key in RENAMED:
        new = RENAMED[key]
        return f"{key!r} is {'now ' + new if new else 'gone (its one value is now the only behaviour)'}"
    keys = config_keys()
    sections = sorted({k.split(".")[0] for k in keys})
    section, _, leaf = key.partition(".")
    if section not in sections:
        close = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}{'.' + leaf if leaf else ''}?" if close else ""
        return f"unknown key {key!r}{hint} (sections: {', '.join(sections)})"
    leaves = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
    picks = _suggest(leaf.split(".")[0], leaves)
    hint = f"; did you mean {' or '.join(f'{section}.{name}' for name in picks[:3])}?" if picks else ""
    return f"unknown key {key!r}{hint} ({section} has: {', '.join(leaves)})"


def _merge(base: Any, update: Any, where: str) -> Any:
    """``OmegaConf.merge`` whose schema errors name ``where`` (a file or an override) and the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        key = str(e.full_key)
        if isinstance(update, Mapping) or hasattr(update, "keys"):  # the override's own key, when OmegaConf cut it short
            key = next((k for k in RENAMED if k.startswith(key) and _has_key(update, k)), key)
        raise ConfigError(f"{where}: {_unknown_key_message(key)}") from None
    except OmegaConfBaseException as e:
        key = f"{e.full_key!r}: " if getattr(e, "full_key", None) else ""
        message = str(e).splitlines()[0]
        if "is not a ListConfig" in message:  # OmegaConf's words for a scalar where a list belongs
            message = "expected a list, e.g. [16, 32, 64]"
        raise ConfigError(f"{where}: {key}{message}") from None


def _has_key(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(tree, "keys") or part not in tree:
            return False
        tree = tree[part]
    return True


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file + dotted ``key=value`` overrides -> a typed, validated ``TrainConfig``.

    Every error is a ``ConfigError`` naming the file (and line) or the override, and the key.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(TrainConfig)
    if path is not None:
        merged = _merge(merged, _load_yaml(Path(path)), str(path))
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.learning_rate=2e-5)")
        try:  # "key=" sets an empty string (e.g. model.pretrained= for a model built from scratch)
            update = OmegaConf.from_dotlist([item if value.strip() else f"{key}=''"])
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item}: {value!r} is not a valid value ({getattr(e, 'problem', e)})") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item}: {str(e).splitlines()[0]}") from None
        merged = _merge(merged, update, f"override {item}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key {getattr(e, 'full_key', None)!r}: {str(e).splitlines()[0]}") from None
    _validate(config)
    return config


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()):
    """A YAML config; its ``base: other.yaml`` (relative to it) is loaded first and overridden."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a YAML file such as conf/sst2.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise yaml_error(path, e) from None
    if raw is None or (isinstance(raw, DictConfig) and len(raw) == 0):
        raise ConfigError(f"{path} holds no settings; expected sections model:, data:, train: (see conf/sst2.yaml)")
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train:), got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not (path.parent / str(base)).is_file():
        raise ConfigError(f"{path}: base: {base} does not exist (looked for {path.parent / str(base)})")
    return _merge(_load_yaml(path.parent / base, seen + (path.resolve(),)), raw, str(path))


def _validate(config: TrainConfig) -> None:
    train, data = config.train, config.data
    checks = [
        (train.global_batch_size > 0, "train.global_batch_size", "a positive integer"),
        (train.learning_rate > 0, "train.learning_rate", "positive"),
        (train.num_epochs > 0, "train.num_epochs", "positive"),
        (train.warmup_steps >= 0, "train.warmup_steps", "at least 0"),
        (train.max_steps == -1 or train.max_steps > 0, "train.max_steps", "-1 (the whole schedule) or a positive number of steps"),
        (train.eval_every_steps >= 0, "train.eval_every_steps", "at least 0 (0: at the end of every epoch)"),
        (0 <= train.adam_b1 < 1, "train.adam_b1", "in [0, 1)"),
        (0 <= train.adam_b2 < 1, "train.adam_b2", "in [0, 1)"),
        (train.adam_eps > 0, "train.adam_eps", "positive"),
        (train.weight_decay >= 0, "train.weight_decay", "at least 0"),
        (train.max_grad_norm > 0, "train.max_grad_norm", "positive"),
        (train.eval_batch_size > 0, "train.eval_batch_size", "a positive integer"),
        (train.log_every_steps > 0, "train.log_every_steps", "a positive integer"),
        (train.checkpoint_every_steps > 0, "train.checkpoint_every_steps", "a positive integer"),
        (train.keep_checkpoints > 0, "train.keep_checkpoints", "a positive integer"),
        (bool(data.path.strip()), "data.path", "a GLUE folder, a file, a hub data set id or 'synthetic'"),
        (data.max_seq_length >= 2, "data.max_seq_length", "at least 2"),
        (all(2 <= b <= data.max_seq_length for b in data.length_buckets),
         "data.length_buckets", f"lengths in [2, data.max_seq_length={data.max_seq_length}]"),
        (all(str(name).strip() for name in config.model.labels) and len(set(config.model.labels)) == len(config.model.labels),
         "model.labels", "distinct, non-empty names (id2label in order), or [] for the checkpoint's"),
    ]
    for ok, key, want in checks:
        if not ok:
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config key {key!r} = {value!r}; expected {want}")
    if config.model.attention not in ATTENTION_KINDS:
        raise ConfigError(f"config key 'model.attention' = {config.model.attention!r}; expected {ATTENTION_CHOICES}")
    for key in ("dtype", "residual_dtype"):
        value = getattr(config.model, key)
        if key == "residual_dtype" and not value:
            continue
        try:
            parse_dtype(value)
        except ValueError as e:
            raise ConfigError(f"config key 'model.{key}' = {value!r}: {e}") from None
    fields = ModelConfig.fields()
    for key in config.model.config:
        if key not in fields:
            picks = _suggest(key, fields)
            hint = f"; did you mean {' or '.join(f'model.config.{p}' for p in picks[:3])}?" if picks else ""
            raise ConfigError(f"unknown key 'model.config.{key}'{hint} (config.json fields: {', '.join(fields)})")


def check_sequence_length(config: TrainConfig, model_config: ModelConfig, source: str) -> None:
    """``data.max_seq_length`` must fit the model's position table (checked before anything compiles);
    ``source`` names where the model's config comes from."""
    if config.data.max_seq_length > model_config.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={config.data.max_seq_length} is longer than the model's "
                          f"max_position_embeddings={model_config.max_position_embeddings} ({source}); "
                          f"use data.max_seq_length={model_config.max_position_embeddings} or less")


def train_config_to_yaml(config: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))
