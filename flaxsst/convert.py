"""Hugging Face checkpoints <-> flaxsst parameters.

One rename table (``distilbert_key_table``) maps every HF DistilBERT state-dict key
to its Flax path; kernels of linear layers are the only transposed tensors. A
BERT-family checkpoint (``BertModel``/``BertFor*``, MiniLM ...) is first renamed
into DistilBERT keys (``bert_to_distilbert_key``), with ``token_type_embeddings[0]``
folded into the position embeddings, so both families share the same table.

Every tensor's shape is checked against the config; missing and unexpected keys
are listed in the error together with the file they came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.config import ModelConfig
from flaxsst.errors import CheckpointError, ConfigError
from flaxsst.hub import resolve_model_dir
from flaxsst.model import init_params, sinusoidal_position_table

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
HEAD_PREFIXES = ("pre_classifier.", "classifier.")


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` did beyond a plain rename."""

    source: str
    family: str
    initialized: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    folded: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {self.family} checkpoint from {self.source}"]
        if self.initialized:
            lines.append(f"freshly initialised (not in the checkpoint): {', '.join(self.initialized)}")
        if self.dropped:
            lines.append(f"not used (no place in DistilBertForSequenceClassification): {', '.join(self.dropped)}")
        if self.folded:
            lines.append(f"folded into the position embeddings: {', '.join(self.folded)}")
        return "\n".join(lines)


# ---- the rename table ---------------------------------------------------------------

def distilbert_key_table(config: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """``(hf_key, flax_path, transposed)`` for every tensor of ``DistilBertForSequenceClassification``."""
    table: list[tuple[str, tuple[str, ...], bool]] = []

    def linear(hf: str, path: tuple[str, ...]) -> None:
        table.append((f"{hf}.weight", path + ("kernel",), True))
        table.append((f"{hf}.bias", path + ("bias",), False))

    def layer_norm(hf: str, path: tuple[str, ...]) -> None:
        table.append((f"{hf}.weight", path + ("scale",), False))
        table.append((f"{hf}.bias", path + ("bias",), False))

    emb = ("distilbert", "embeddings")
    table.append(("distilbert.embeddings.word_embeddings.weight", emb + ("word_embeddings", "embedding"), False))
    if not config.sinusoidal_pos_embds:
        table.append(("distilbert.embeddings.position_embeddings.weight", emb + ("position_embeddings", "embedding"), False))
    layer_norm("distilbert.embeddings.LayerNorm", emb + ("LayerNorm",))
    for i in range(config.n_layers):
        hf = f"distilbert.transformer.layer.{i}"
        path = ("distilbert", "transformer", "layer", str(i))
        for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
            linear(f"{hf}.attention.{name}", path + ("attention", name))
        layer_norm(f"{hf}.sa_layer_norm", path + ("sa_layer_norm",))
        linear(f"{hf}.ffn.lin1", path + ("ffn", "lin1"))
        linear(f"{hf}.ffn.lin2", path + ("ffn", "lin2"))
        layer_norm(f"{hf}.output_layer_norm", path + ("output_layer_norm",))
    linear("pre_classifier", ("pre_classifier",))
    linear("classifier", ("classifier",))
    return table


def expected_shape(path: tuple[str, ...], config: ModelConfig) -> tuple[int, ...]:
    """The Flax shape of the parameter at ``path``."""
    dim, leaf, owner = config.dim, path[-1], path[-2]
    if owner == "word_embeddings":
        return (config.vocab_size, dim)
    if owner == "position_embeddings":
        return (config.max_position_embeddings, dim)
    if owner in ("LayerNorm", "sa_layer_norm", "output_layer_norm"):
        return (dim,)
    out_features = {"lin1": config.hidden_dim, "classifier": config.num_labels}.get(owner, dim)
    in_features = config.hidden_dim if owner == "lin2" else dim
    return (in_features, out_features) if leaf == "kernel" else (out_features,)


_BERT_RULES = [
    (r"^embeddings\.", "distilbert.embeddings."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"distilbert.transformer.layer.\1.attention.q_lin."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"distilbert.transformer.layer.\1.attention.k_lin."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"distilbert.transformer.layer.\1.attention.v_lin."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"distilbert.transformer.layer.\1.attention.out_lin."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"distilbert.transformer.layer.\1.sa_layer_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"distilbert.transformer.layer.\1.ffn.lin1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"distilbert.transformer.layer.\1.ffn.lin2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"distilbert.transformer.layer.\1.output_layer_norm."),
]
# Tensors with no place in the DistilBERT-shaped classifier, dropped with a note.
_DROPPED = {
    "distilbert": [r"^vocab_(transform|layer_norm|projector)\.", r"^qa_outputs\.", r"\.position_ids$"],
    "bert": [r"^pooler\.", r"^cls\.", r"^classifier\.", r"^qa_outputs\.", r"\.position_ids$"],
}


def _normalise_key(key: str) -> str:
    # Old TF-era checkpoints name LayerNorm parameters gamma/beta.
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


def bert_to_distilbert_key(key: str) -> str | None:
    """``encoder.layer.0.attention.self.query.weight`` -> ``distilbert.transformer.layer.0.attention.q_lin.weight``."""
    key = _normalise_key(key.removeprefix("bert."))
    for pattern, replacement in _BERT_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


# ---- config translation ---------------------------------------------------------------

def config_from_hf(data: dict[str, Any], source: str = CONFIG_NAME, **overrides: Any) -> tuple[ModelConfig, str]:
    """A HF ``config.json`` dict -> ``(ModelConfig, family)`` with family ``"distilbert"`` or ``"bert"``;
    a missing or bad field is a ``CheckpointError`` naming ``source``."""
    try:
        return _config_from_hf(data, source, **overrides)
    except KeyError as e:
        raise CheckpointError(f"{source}: no {e.args[0]!r} field") from None
    except (ConfigError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {e}") from None


def _config_from_hf(data: dict[str, Any], source: str, **overrides: Any) -> tuple[ModelConfig, str]:
    model_type = data.get("model_type", "distilbert")
    if model_type == "distilbert":
        return ModelConfig.from_dict(data, **overrides), "distilbert"
    if model_type == "bert":
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{source}: position_embedding_type={data['position_embedding_type']!r} is not supported; "
                "only 'absolute' position embeddings map onto DistilBERT"
            )
        activation = data.get("hidden_act", "gelu")
        if activation not in ("gelu", "relu"):
            raise CheckpointError(f"{source}: hidden_act={activation!r} is not supported; expected 'gelu' or 'relu'")
        fields = dict(
            vocab_size=data["vocab_size"],
            max_position_embeddings=data["max_position_embeddings"],
            n_layers=data["num_hidden_layers"],
            n_heads=data["num_attention_heads"],
            dim=data["hidden_size"],
            hidden_dim=data["intermediate_size"],
            dropout=data.get("hidden_dropout_prob", 0.1),
            attention_dropout=data.get("attention_probs_dropout_prob", 0.1),
            activation=activation,
            initializer_range=data.get("initializer_range", 0.02),
            seq_classif_dropout=data.get("classifier_dropout") or data.get("hidden_dropout_prob", 0.1),
            pad_token_id=data.get("pad_token_id") or 0,
            layer_norm_eps=data.get("layer_norm_eps", 1e-12),
        )
        if "id2label" in data:
            fields["id2label"] = data["id2label"]
            fields["label2id"] = data.get("label2id")
        fields.update(overrides)
        return ModelConfig(**fields), "bert"
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported; expected 'distilbert' or a BERT-family encoder ('bert')"
    )


# ---- reading weights --------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated? "
                              "download or export it again") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle: reading it needs torch (pip install torch). "
            "Checkpoints in model.safetensors need no torch."
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign pickle
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a ``CheckpointError`` naming the file and the line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_state_dict(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a HF checkpoint folder, and the file each came from.

    Looks for ``model.safetensors``, a sharded ``model.safetensors.index.json``,
    ``pytorch_model.bin`` or its sharded index, in that order.
    """
    model_dir = Path(model_dir)
    for index_name, reader in ((SAFETENSORS_INDEX_NAME, _read_safetensors), (PYTORCH_INDEX_NAME, _read_torch)):
        index_path = model_dir / index_name
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map' object")
            tensors, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                shard_path = model_dir / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"{index_path} names shard {shard!r}, which is missing from {model_dir}")
                for key, value in reader(shard_path).items():
                    tensors[key], origin[key] = value, str(shard_path)
            return tensors, origin
    for name, reader in ((SAFETENSORS_NAME, _read_safetensors), (PYTORCH_NAME, _read_torch)):
        path = model_dir / name
        if path.is_file():
            tensors = reader(path)
            return tensors, {key: str(path) for key in tensors}
    raise CheckpointError(
        f"{model_dir} holds no weights: expected one of {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
        f"{PYTORCH_NAME}, {PYTORCH_INDEX_NAME}; found {sorted(p.name for p in model_dir.iterdir())}"
    )


# ---- HF -> Flax ---------------------------------------------------------------------------

def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def state_dict_to_params(
    tensors: dict[str, np.ndarray],
    config: ModelConfig,
    family: str,
    origin: dict[str, str] | None = None,
    rng: jax.Array | int = 0,
) -> tuple[dict, LoadReport]:
    """HF state dict -> Flax params of ``DistilBertForSequenceClassification``.

    A missing classification head is freshly initialised; missing encoder tensors,
    unknown keys and wrong shapes raise ``CheckpointError``.
    """
    origin = origin or {}
    files = sorted(set(origin.values())) or ["<state dict>"]
    report = LoadReport(source=", ".join(files), family=family)
    renamed: dict[str, str] = {}
    unexpected: list[str] = []
    token_type_key = None
    for key in tensors:
        bare = key.removeprefix("bert.") if family == "bert" else key
        if any(re.search(p, bare) for p in _DROPPED[family]):
            report.dropped.append(key)
            continue
        if family == "bert":
            if _normalise_key(bare) == "embeddings.token_type_embeddings.weight":
                token_type_key = key
                continue
            target = bert_to_distilbert_key(key)
        else:
            target = _normalise_key(key)
            if not target.startswith("distilbert.") and not target.startswith(HEAD_PREFIXES):
                target = "distilbert." + target
        if target is None:
            unexpected.append(key)
        elif config.sinusoidal_pos_embds and target == "distilbert.embeddings.position_embeddings.weight":
            report.dropped.append(key)
        else:
            renamed[target] = key
    table = distilbert_key_table(config)
    known = {hf for hf, _, _ in table}
    unexpected += [renamed.pop(k) for k in list(renamed) if k not in known]
    missing = [hf for hf, _, _ in table if hf not in renamed]
    missing_encoder = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if unexpected or missing_encoder:
        layers = {int(m.group(1)) for key in tensors if (m := re.search(r"\.layers?\.(\d+)\.", key))}
        found = f"the weights hold {max(layers) + 1} layers; " if layers and max(layers) + 1 != config.n_layers else ""
        raise CheckpointError(
            f"{', '.join(files)} does not match a {family} encoder of this config "
            f"(n_layers={config.n_layers}, dim={config.dim}, sinusoidal_pos_embds={config.sinusoidal_pos_embds}): "
            f"{found}{_some(missing_encoder, 'missing')}; {_some(sorted(unexpected), 'unexpected')}"
        )
    params: dict = {}
    bad_shapes = []
    for hf_key, path, transposed in table:
        if hf_key not in renamed:
            continue
        source_key = renamed[hf_key]
        value = np.asarray(tensors[source_key])
        if transposed:
            value = value.T
        want = expected_shape(path, config)
        if value.shape != want:
            bad_shapes.append(
                f"{source_key} in {origin.get(source_key, '<state dict>')}: shape {tuple(np.asarray(tensors[source_key]).shape)}, "
                f"expected {want[::-1] if transposed else want}"
            )
            continue
        if path[-2] == "position_embeddings" and token_type_key is not None:
            token_types = np.asarray(tensors[token_type_key])
            if token_types.ndim != 2 or token_types.shape[1] != config.dim:
                bad_shapes.append(f"{token_type_key}: shape {token_types.shape}, expected (type_vocab_size, {config.dim})")
                continue
            value = value.astype(np.float32) + token_types[0].astype(np.float32)
            report.folded.append(f"{token_type_key}[0]")
        _set(params, path, jnp.asarray(value, dtype=jnp.float32))
    if bad_shapes:
        more = f"; and {len(bad_shapes) - 3} more" if len(bad_shapes) > 3 else ""
        raise CheckpointError(
            f"{len(bad_shapes)} tensor{'s' if len(bad_shapes) != 1 else ''} with the wrong shape for its config.json "
            f"(dim={config.dim}, hidden_dim={config.hidden_dim}, vocab_size={config.vocab_size}): "
            + "; ".join(bad_shapes[:3]) + more)
    head_missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if head_missing:
        fresh = init_params(config, rng)
        for hf_key, path, _ in table:
            if hf_key in head_missing:
                _set(params, path, jnp.asarray(_get(fresh, path), dtype=jnp.float32))
        report.initialized = head_missing
    return params, report


def _some(keys: list[str], what: str, shown: int = 3) -> str:
    """``"48 missing keys (a, b, c, ...)"``: a count and the first few, for a one-line error."""
    if not keys:
        return f"no {what} keys"
    more = ", ..." if len(keys) > shown else ""
    return f"{len(keys)} {what} key{'s' if len(keys) != 1 else ''} ({', '.join(keys[:shown])}{more})"


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    rng: jax.Array | int = 0,
    return_report: bool = False,
    setting: str | None = None,
    **config_overrides: Any,
):
    """A HF folder or hub id -> ``(ModelConfig, params)`` (``+ LoadReport`` with ``return_report``).

    DistilBERT checkpoints (with or without a classification head) and BERT-family
    encoders load into the same DistilBERT-shaped model; fp16/bf16 weights are cast
    to float32. ``config_overrides`` replace config fields (e.g. ``id2label``). ``setting`` names
    where the name came from (``model.pretrained``, ``--model``) in errors.
    """
    model_dir = resolve_model_dir(name_or_path, key=setting, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    return read_pretrained(model_dir, rng=rng, return_report=return_report, **config_overrides)


def read_pretrained(model_dir: Path, *, rng: jax.Array | int = 0, return_report: bool = False,
                    **config_overrides: Any):
    """``load_pretrained`` of a local folder already resolved (``flaxsst.hub.resolve_model_dir``)."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no {CONFIG_NAME}; found {sorted(p.name for p in model_dir.iterdir())}")
    config, family = config_from_hf(_read_json(config_path), str(config_path),
                                    **config_overrides)
    tensors, origin = read_state_dict(model_dir)
    params, report = state_dict_to_params(tensors, config, family, origin, rng)
    if return_report:
        return config, params, report
    if report.initialized or report.dropped or report.folded:
        logger.warning(report.summary())
    return config, params


# ---- Flax -> HF ---------------------------------------------------------------------------

def params_to_state_dict(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flax params -> HF DistilBERT state dict (float32). A params tree without a head
    (``{"distilbert": ...}``) gives the keys of a ``DistilBertModel`` inside the classifier."""
    state: dict[str, np.ndarray] = {}
    for hf_key, path, transposed in distilbert_key_table(config):
        try:
            value = np.asarray(jax.device_get(_get(params, path)), dtype=np.float32)
        except KeyError:
            if hf_key.startswith(HEAD_PREFIXES):
                continue
            raise CheckpointError(f"params have no {'/'.join(path)} (needed for {hf_key})") from None
        if value.shape != expected_shape(path, config):
            raise CheckpointError(f"params {'/'.join(path)} has shape {value.shape}, expected {expected_shape(path, config)}")
        state[hf_key] = np.ascontiguousarray(value.T if transposed else value)
    if config.sinusoidal_pos_embds:
        state["distilbert.embeddings.position_embeddings.weight"] = sinusoidal_position_table(
            config.max_position_embeddings, config.dim
        )
    return state


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap ``tmp`` into ``out_dir`` so a reader never sees a half-written folder."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def _usual_modes(folder: Path) -> None:
    """The modes a plain ``mkdir`` and ``open`` give under the umask (``mkdtemp`` and some writers make
    files private), so that another user or a serving process can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_pretrained(out_dir: str | os.PathLike, config: ModelConfig, params: dict, tokenizer: Any = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer's files) in HF's layout.

    ``transformers.DistilBertForSequenceClassification.from_pretrained(out_dir)`` loads
    the folder with no missing or unexpected keys.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(params_to_state_dict(params, config), str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        config.to_json_file(tmp / CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _usual_modes(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
