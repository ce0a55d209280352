"""Conversion HF <-> Flax: every checkpoint layout, the hub cache, round trips and errors."""

import json
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from flaxsst.config import ModelConfig
from flaxsst.convert import load_pretrained, save_pretrained
from flaxsst.errors import CheckpointError, HubError
from flaxsst.model import DistilBertForSequenceClassification, init_params
from flaxsst.tokenizer import Tokenizer
from tests.fixtures import hub_model_cache, random_ids, tiny_hf_config


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def _hf_model(out, **kwargs):
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(tiny_hf_config(120, **kwargs)).eval()
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_flax_to_hf_to_flax_round_trip_is_exact_and_hf_loads_cleanly(tmp_path, vocab_file, sinusoidal):
    config = ModelConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                         sinusoidal_pos_embds=sinusoidal, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    params = init_params(config, 7)
    save_pretrained(tmp_path / "export", config, params, tokenizer=Tokenizer.from_file(vocab_file))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in (tmp_path / "export").iterdir()}

    loaded_config, loaded = load_pretrained(tmp_path / "export")
    _assert_trees_equal(params, loaded)
    assert loaded_config.to_dict() == config.to_dict()

    hf, info = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    ids, mask = random_ids(np.random.default_rng(0), 4, 20, 120)
    flax_logits = DistilBertForSequenceClassification(config).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(np.asarray(flax_logits), _torch_logits(hf.eval(), ids, mask), atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export")("a film")["input_ids"] == \
        Tokenizer.from_file(vocab_file).encode(["a film"])[0]


def test_export_replaces_an_existing_folder_whole(tmp_path):
    config = ModelConfig(vocab_size=120, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "stale.bin").write_text("old")
    save_pretrained(tmp_path / "export", config, init_params(config))
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_export_is_readable_by_others_as_the_umask_allows(tmp_path):
    import os
    import stat

    config = ModelConfig(vocab_size=120, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    old = os.umask(0o022)
    try:
        save_pretrained(tmp_path / "export", config, init_params(config))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "export", *(tmp_path / "export").iterdir()]}
    assert modes == {"export": 0o755, "config.json": 0o644, "model.safetensors": 0o644}


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_float32(tmp_path, torch_dtype):
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(tiny_hf_config(120)).to(torch_dtype)
    model.save_pretrained(tmp_path)
    config, params = load_pretrained(tmp_path)
    kernel = params["distilbert"]["transformer"]["layer"]["1"]["ffn"]["lin1"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(kernel), model.distilbert.transformer.layer[1].ffn.lin1.weight.detach().float().numpy().T)
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(params)} == {"float32"}


def test_sharded_safetensors_load_like_a_single_file(tmp_path):
    model = _hf_model(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, single = load_pretrained(tmp_path / "single")
    _, sharded = load_pretrained(tmp_path / "sharded")
    _assert_trees_equal(single, sharded)


def test_pytorch_bin_checkpoint_loads_and_without_torch_says_what_is_needed(tmp_path, monkeypatch):
    model = _hf_model(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    config, params = load_pretrained(tmp_path / "bin")
    ids, mask = random_ids(np.random.default_rng(1), 3, 16, 120)
    logits = DistilBertForSequenceClassification(config).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(model, ids, mask), atol=1e-5, rtol=0)

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pytorch_model\.bin is a PyTorch pickle: reading it needs torch"):
        load_pretrained(tmp_path / "bin")


@pytest.mark.parametrize("hf_class", [transformers.DistilBertModel, transformers.DistilBertForMaskedLM])
def test_encoder_only_checkpoints_get_a_fresh_head_and_the_report_says_so(tmp_path, hf_class):
    torch.manual_seed(0)
    model = hf_class(tiny_hf_config(120)).eval()
    model.save_pretrained(tmp_path)
    config, params, report = load_pretrained(tmp_path, return_report=True)
    assert report.initialized == ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"]
    assert "freshly initialised" in report.summary()
    if hf_class is transformers.DistilBertForMaskedLM:
        assert any(k.startswith("vocab_projector") for k in report.dropped)
        encoder = model.distilbert
    else:
        encoder = model
    np.testing.assert_array_equal(
        np.asarray(params["distilbert"]["transformer"]["layer"]["0"]["attention"]["q_lin"]["kernel"]),
        encoder.transformer.layer[0].attention.q_lin.weight.detach().numpy().T,
    )
    assert params["classifier"]["kernel"].shape == (32, 2)
    assert float(np.std(np.asarray(params["pre_classifier"]["kernel"]))) == pytest.approx(0.02, rel=0.2)


def test_hub_id_resolves_through_the_hub_cache_offline(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = hub_model_cache(tmp_path / "hub", "someorg/tiny-sst2", tiny_model_dir)
    config, params = load_pretrained("someorg/tiny-sst2", cache_dir=tmp_path / "hub")
    _, direct = load_pretrained(snapshot)
    _assert_trees_equal(params, direct)

    from flaxsst import Classifier

    clf = Classifier.from_pretrained("someorg/tiny-sst2", cache_dir=tmp_path / "hub")
    assert clf(["a fine film"])[0]["label"] in {"POSITIVE", "NEGATIVE"}
    with pytest.raises(HubError, match="'someorg/not-cached' is neither a local folder nor a hub model"):
        load_pretrained("someorg/not-cached", cache_dir=tmp_path / "hub")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(HubError, match="folder .*/no/such/model does not exist"):
        load_pretrained(str(tmp_path / "no" / "such" / "model"))


def test_folder_without_weights_lists_what_it_holds(tmp_path):
    _hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no weights: expected one of model\.safetensors.*found \['config\.json'"):
        load_pretrained(tmp_path)


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path):
    _hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_dim"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"distilbert\.transformer\.layer\.0\.ffn\.lin1\.weight in .*model\.safetensors: "
                                              r"shape \(64, 32\), expected \(80, 32\)"):
        load_pretrained(tmp_path)
    config["hidden_dim"], config["dim"] = 64, 48  # every tensor of the model: the first three and a count
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert message.startswith("37 tensors with the wrong shape for its config.json (dim=48, hidden_dim=64, vocab_size=120): ")
    assert message.count("expected (") == 3 and message.endswith("; and 34 more") and len(message) < 800


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("distilbert.transformer.layer.1.ffn.lin2.bias")
    tensors["distilbert.transformer.layer.1.ffn.lin3.bias"] = np.zeros(32, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "model.safetensors" in message
    assert "1 missing key (distilbert.transformer.layer.1.ffn.lin2.bias)" in message
    assert "1 unexpected key (distilbert.transformer.layer.1.ffn.lin3.bias)" in message


def test_weights_with_other_layers_than_config_json_say_so_in_one_short_line(tmp_path):
    _hf_model(tmp_path)  # two layers
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layers"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "(n_layers=6," in message and "the weights hold 2 layers" in message
    assert "64 missing keys (distilbert.transformer.layer.2." in message and ", ...)" in message  # 16 per layer
    assert "no unexpected keys" in message and "\n" not in message and len(message) < 600


def test_unsupported_model_type_is_named(tmp_path):
    _hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2' is not supported"):
        load_pretrained(tmp_path)


def test_bert_checkpoint_with_classifier_drops_pooler_and_head(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64)
    transformers.BertForSequenceClassification(hf_config).save_pretrained(tmp_path)
    config, params, report = load_pretrained(tmp_path, return_report=True)
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(report.dropped)
    assert report.initialized and report.folded == ["bert.embeddings.token_type_embeddings.weight[0]"]
    assert (config.dim, config.n_layers, config.hidden_dim) == (32, 2, 64)
