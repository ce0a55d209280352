"""YAML configs, dotted overrides and their errors."""

from pathlib import Path

import pytest

from flaxsst.config import ConfigError, load_train_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_recipe_numbers_are_those_of_the_model_card():
    config = load_train_config(CONF / "sst2.yaml")
    train = config.train
    assert (train.learning_rate, train.global_batch_size, train.warmup_steps, train.num_epochs) == (1e-5, 32, 600, 3)
    assert (train.adam_b1, train.adam_b2, train.adam_eps, train.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert (train.max_grad_norm, train.seed, config.data.max_seq_length) == (1.0, 42, 128)
    assert config.model.pretrained == "distilbert-base-uncased"


def test_minilm_config_takes_the_recipe_from_sst2_yaml():
    recipe = load_train_config(CONF / "sst2.yaml")
    minilm = load_train_config(CONF / "sst2_minilm.yaml")
    assert minilm.train == recipe.train
    assert minilm.data.max_seq_length == 128 and minilm.model.dtype == "bfloat16"


def test_dotted_overrides_are_typed():
    config = load_train_config(CONF / "sst2.yaml", ["train.learning_rate=2e-5", "data.path=glue_data/SST-2",
                                                     "data.length_buckets=[32,64,128]"])
    assert config.train.learning_rate == 2e-5 and isinstance(config.train.learning_rate, float)
    assert config.data.path == "glue_data/SST-2" and config.data.length_buckets == [32, 64, 128]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'train.learning_rat'"):
        load_train_config(CONF / "sst2.yaml", ["train.learning_rat=2e-5"])


def test_wrong_type_is_named_with_its_value():
    with pytest.raises(ConfigError, match="'train.global_batch_size'.*'thirty-two'"):
        load_train_config(CONF / "sst2.yaml", ["train.global_batch_size=thirty-two"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"'train.global_batch_size' = 0; expected a positive integer"):
        load_train_config(CONF / "sst2.yaml", ["train.global_batch_size=0"])
    with pytest.raises(ConfigError, match=r"'train.eval_every_steps' = -1; expected at least 0"):
        load_train_config(CONF / "sst2.yaml", ["train.eval_every_steps=-1"])
    for steps in (0, -3):
        with pytest.raises(ConfigError, match=rf"'train.max_steps' = {steps}; expected -1 \(the whole schedule\) or a positive"):
            load_train_config(CONF / "sst2.yaml", [f"train.max_steps={steps}"])
    with pytest.raises(ConfigError, match="data.length_buckets"):
        load_train_config(CONF / "sst2.yaml", ["data.length_buckets=[256]"])
    with pytest.raises(ConfigError, match=r"override data.length_buckets=abc: 'data.length_buckets': expected a list, e.g. \[16, 32, 64\]"):
        load_train_config(CONF / "sst2.yaml", ["data.length_buckets=abc"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_train_config(CONF / "sst2.yaml", ["train.learning_rate"])
    for key in ("model.dtype", "model.residual_dtype"):
        with pytest.raises(ConfigError, match=rf"'{key}' = 'float17'"):
            load_train_config(CONF / "sst2.yaml", [f"{key}=float17"])
    assert load_train_config(CONF / "sst2.yaml", ["model.residual_dtype=float32"]).model.residual_dtype == "float32"
    with pytest.raises(ConfigError, match=r"unknown key 'model.config.dimm'; did you mean model.config.dim\?"):
        load_train_config(CONF / "sst2.yaml", ["model.config.dimm=64"])
    for labels in ("[POS,POS]", '["",B]'):
        with pytest.raises(ConfigError, match=r"'model.labels' = .*; expected distinct, non-empty names"):
            load_train_config(CONF / "sst2.yaml", [f"model.labels={labels}"])
    assert load_train_config(CONF / "sst2.yaml", ["model.labels=[neg,pos]"]).model.labels == ["neg", "pos"]


def test_keys_of_earlier_versions_say_their_new_names():
    for old, new in (("model.init=x", "'model.init' is now model.pretrained"),
                     ("model.dropout=0.0", "'model.dropout' is now model.config.dropout"),
                     ("train.parallel=pmap", "'train.parallel' is gone")):
        with pytest.raises(ConfigError, match=new):
            load_train_config(CONF / "sst2.yaml", [old])


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("base: " + str(CONF / "sst2.yaml") + "\ntrain:\n  warmup: 10\n")
    with pytest.raises(ConfigError, match="'train.warmup'"):
        load_train_config(tmp_path / "bad.yaml")


def test_an_empty_file_and_a_missing_base_are_named(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml holds no settings"):
        load_train_config(tmp_path / "empty.yaml")
    (tmp_path / "run.yaml").write_text("base: nosuch.yaml\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: base: nosuch\.yaml does not exist \(looked for .*nosuch\.yaml\)"):
        load_train_config(tmp_path / "run.yaml")
