"""The Flax model against transformers' PyTorch DistilBERT / BERT with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flaxsst.config import ModelConfig
from flaxsst.convert import config_from_hf, load_pretrained, state_dict_to_params
from flaxsst.model import DistilBertForSequenceClassification, DistilBertModel, Precision, init_params
from tests.fixtures import data_subfolder, random_ids


def _torch_state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hf_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def _flax_logits(config, params, ids, mask, precision=Precision()) -> np.ndarray:
    return np.asarray(DistilBertForSequenceClassification(config, precision).apply({"params": params}, ids, mask,
                                                                                   deterministic=True))


@pytest.mark.parametrize(
    "hf_kwargs",
    [
        pytest.param({}, id="full-size-768-6-12-3072"),
        pytest.param(dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64), id="tiny"),
        pytest.param(dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, activation="relu"), id="tiny-relu"),
        pytest.param(dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, sinusoidal_pos_embds=True), id="tiny-sinusoidal"),
        pytest.param(dict(dim=48, n_layers=1, n_heads=3, hidden_dim=96, num_labels=5), id="tiny-5-labels"),
    ],
)
def test_classifier_logits_equal_transformers_on_padded_batch(hf_kwargs):
    torch.manual_seed(1)
    hf_config = transformers.DistilBertConfig(**hf_kwargs)
    reference = transformers.DistilBertForSequenceClassification(hf_config).eval()
    config, family = config_from_hf(hf_config.to_dict())
    params, _ = state_dict_to_params(_torch_state(reference), config, family)
    ids, mask = random_ids(np.random.default_rng(0), batch=6, seq=40, vocab=hf_config.vocab_size)
    got = _flax_logits(config, params, ids, mask)
    assert got.dtype == np.float32 and got.shape == (6, config.num_labels)
    np.testing.assert_allclose(got, _hf_logits(reference, ids, mask), atol=1e-4, rtol=0)


def test_encoder_hidden_states_equal_transformers_distilbert_model():
    torch.manual_seed(2)
    hf_config = transformers.DistilBertConfig(dim=64, n_layers=3, n_heads=4, hidden_dim=128)
    reference = transformers.DistilBertModel(hf_config).eval()
    config, family = config_from_hf(hf_config.to_dict())
    params, report = state_dict_to_params(_torch_state(reference), config, family)
    assert report.initialized == ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"]
    ids, mask = random_ids(np.random.default_rng(1), batch=5, seq=33, vocab=hf_config.vocab_size)
    hidden = DistilBertModel(config).apply({"params": params["distilbert"]}, ids, mask, deterministic=True)
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    assert hidden.shape == (5, 33, 64)
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-4, rtol=0)
    # cls_only: the [CLS] position's last hidden state alone, as the classifier uses it
    cls = DistilBertModel(config).apply({"params": params["distilbert"]}, ids, mask, deterministic=True, cls_only=True)
    assert cls.shape == (5, 1, 64)
    np.testing.assert_allclose(np.asarray(cls), expected[:, :1], atol=1e-4, rtol=0)


def test_classifier_computes_the_last_block_for_the_cls_position_only():
    """The classifier's forward does the matmul FLOPs worked out by hand for a last block that
    queries from [CLS] alone: DistilBERT-base at 128 tokens, 13.9% fewer than the full encoder's."""
    config = ModelConfig()
    seq, d, h = 128, config.dim, config.hidden_dim
    block = 8 * seq * d * d + 4 * seq * d * h + 4 * seq * seq * d  # QKV + out, FFN, scores + context
    last_cls = 4 * seq * d * d + (4 * d * d + 4 * d * h + 4 * seq * d)  # K, V for all; Q, out, FFN, attention for [CLS]
    head = 2 * d * d + 2 * d * config.num_labels
    expected = 5 * block + last_cls + head
    assert 1 - (5 * block + last_cls) / (6 * block) == pytest.approx(0.139, abs=1e-3)
    params = jax.eval_shape(lambda: init_params(config))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    forward = jax.jit(lambda p, i, m: DistilBertForSequenceClassification(config).apply({"params": p}, i, m))
    cost = forward.lower(params, ids, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts elementwise work (softmax, GELU, LayerNorm) too: a little above the matmuls alone
    assert expected <= cost["flops"] < 1.03 * expected


def _bert_hidden(reference, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()


@pytest.mark.parametrize("prefixed", [False, True], ids=["BertModel-keys", "bert.-prefixed-keys"])
def test_bert_family_encoder_equals_transformers_bert_model(prefixed):
    """MiniLM-L6 shape (384/6/12/1536), random weights, token_type_embeddings non-zero."""
    torch.manual_seed(3)
    hf_config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    reference = transformers.BertModel(hf_config).eval()
    with torch.no_grad():
        reference.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    state = _torch_state(reference)
    if prefixed:
        state = {f"bert.{k}": v for k, v in state.items()}
    config, family = config_from_hf(hf_config.to_dict())
    params, report = state_dict_to_params(state, config, family)
    assert family == "bert" and report.folded
    ids, mask = random_ids(np.random.default_rng(2), batch=4, seq=50, vocab=hf_config.vocab_size)
    hidden = DistilBertModel(config).apply({"params": params["distilbert"]}, ids, mask, deterministic=True)
    np.testing.assert_allclose(np.asarray(hidden), _bert_hidden(reference, ids, mask), atol=1e-4, rtol=0)


def test_real_pretrained_minilm_equals_transformers(test_data):
    folder = data_subfolder(test_data, "minilm-l6")
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    config, params = load_pretrained(folder)
    assert params["distilbert"]["embeddings"]["word_embeddings"]["embedding"].dtype == jnp.float32
    from flaxsst.tokenizer import Tokenizer, pad_right

    tok = Tokenizer.from_pretrained(folder, max_length=64)
    texts = ["it 's a charming and often affecting journey . ", "unflinchingly bleak and desperate ", "a"]
    input_ids, mask = pad_right(tok.encode(texts), len(texts), 64, tok.pad_id)
    hidden = DistilBertModel(config).apply({"params": params["distilbert"]}, input_ids, mask, deterministic=True)
    # Real tokens only: the states at padding positions feed nothing (the classifier reads [CLS]), and on
    # some CPUs fp32 rounding alone moves them by 2e-4 at magnitude 4.8, while real tokens agree to 2e-6.
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], _bert_hidden(reference, input_ids, mask)[real], atol=1e-4, rtol=0)


def test_bf16_with_float32_residual_is_as_close_to_fp32_as_torch_autocast(test_data):
    """bf16 drift from fp32 on real weights and SST-2 sentences: ours with a float32 residual stream
    within 1.3x of PyTorch autocast's (bf16 matmuls, fp32 norms and adds); all-bf16 is further off."""
    from flaxsst.tokenizer import Tokenizer, pad_right

    folder = data_subfolder(test_data, "minilm-l6")
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False).eval()
    config, params = load_pretrained(folder)
    rows = (data_subfolder(test_data, "sst2") / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:65]
    tok = Tokenizer.from_pretrained(folder, max_length=64)
    input_ids, mask = pad_right(tok.encode([r.split("\t")[0] for r in rows]), len(rows), 64, tok.pad_id)
    real = mask.astype(bool)

    def ours(**dtypes):
        out = DistilBertModel(config, Precision(**dtypes)).apply({"params": params["distilbert"]}, input_ids, mask,
                                                                 deterministic=True)
        return np.asarray(out.astype(jnp.float32))

    def drift(x, exact):
        return float(np.sqrt(((x - exact)[real] ** 2).mean() / (exact[real] ** 2).mean()))

    exact = ours()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = reference(input_ids=torch.tensor(input_ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask)).last_hidden_state.float().numpy()
    torch_drift = drift(autocast, _bert_hidden(reference, input_ids, mask))
    residual_fp32 = drift(ours(dtype=jnp.bfloat16, residual_dtype=jnp.float32), exact)
    all_bf16 = drift(ours(dtype=jnp.bfloat16), exact)
    assert 0 < residual_fp32 <= 1.3 * torch_drift, (residual_fp32, torch_drift)
    assert residual_fp32 < all_bf16


def test_parameter_tree_is_named_like_the_hf_state_dict():
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=16)
    leaves = jax.tree_util.tree_flatten_with_path(init_params(config))[0]
    paths = {"/".join(key.key for key in path) for path, _ in leaves}
    for expected in [
        "distilbert/embeddings/word_embeddings/embedding",
        "distilbert/embeddings/position_embeddings/embedding",
        "distilbert/embeddings/LayerNorm/scale",
        "distilbert/transformer/layer/0/attention/q_lin/kernel",
        "distilbert/transformer/layer/1/attention/out_lin/bias",
        "distilbert/transformer/layer/1/sa_layer_norm/scale",
        "distilbert/transformer/layer/0/ffn/lin1/kernel",
        "distilbert/transformer/layer/0/ffn/lin2/bias",
        "distilbert/transformer/layer/1/output_layer_norm/bias",
        "pre_classifier/kernel",
        "classifier/bias",
    ]:
        assert expected in paths
    assert len(paths) == 4 + 16 * 2 + 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_compute_masks_safely_and_stays_close_to_fp32(dtype):
    torch.manual_seed(4)
    hf_config = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    reference = transformers.DistilBertForSequenceClassification(hf_config).eval()
    config, family = config_from_hf(hf_config.to_dict())
    params, _ = state_dict_to_params(_torch_state(reference), config, family)
    ids, mask = random_ids(np.random.default_rng(3), batch=6, seq=40, vocab=hf_config.vocab_size)
    mask[1, 1:] = 0  # a row that is all padding but [CLS]
    half = _flax_logits(config, params, ids, mask, Precision(dtype))
    assert half.dtype == np.float32 and np.isfinite(half).all()
    np.testing.assert_allclose(half, _hf_logits(reference, ids, mask), atol=5e-2, rtol=0)


def test_parameters_are_float32_and_precision_sets_the_compute_dtype():
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=50, max_position_embeddings=16)
    params = init_params(config)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    ids = np.ones((2, 8), np.int32)
    hidden = DistilBertModel(config, Precision("bfloat16")).apply({"params": params["distilbert"]}, ids)
    assert hidden.dtype == jnp.bfloat16
    autocast = DistilBertModel(config, Precision("bfloat16", "float32")).apply({"params": params["distilbert"]}, ids)
    assert autocast.dtype == jnp.float32  # the residual stream (LayerNorm outputs) in float32


def test_sequence_longer_than_position_table_is_a_clear_error():
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=50, max_position_embeddings=16)
    params = init_params(config)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings=16"):
        DistilBertForSequenceClassification(config).apply({"params": params}, np.zeros((1, 17), np.int32))
