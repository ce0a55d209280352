"""Hub names: data sets reach ``datasets.load_dataset`` and model ids ``huggingface_hub`` with the right
arguments; with ``HF_HUB_OFFLINE=1`` a hub-style cache loads and anything else is one line saying what
to pass instead."""

from __future__ import annotations

import json

import pytest

from flaxsst.config import DataSection
from flaxsst.data import read_split
from flaxsst.errors import DataError, HubError
from flaxsst.hub import dataset_id, looks_like_path
from tests.commands import command_env, run
from tests.fixtures import hub_dataset_cache, hub_model_cache

LABEL2ID = {"NEGATIVE": 0, "POSITIVE": 1}


@pytest.mark.parametrize("name,expected", [
    ("glue/sst2", ("nyu-mll/glue", "sst2")),
    ("glue/cola", ("nyu-mll/glue", "cola")),
    ("stanfordnlp/sst2", ("stanfordnlp/sst2", None)),
    ("someorg/reviews:english", ("someorg/reviews", "english")),
    ("imdb", ("imdb", None)),
])
def test_dataset_ids_map_to_repository_and_subset(name, expected):
    assert dataset_id(name) == expected
    assert not looks_like_path(name)


@pytest.mark.parametrize("name", ["./glue/SST-2", "/data/sst2", "~/glue", "glue_data/SST-2/train.tsv", "a/b/c"])
def test_paths_are_never_taken_for_hub_ids(name):
    assert looks_like_path(name)


@pytest.mark.parametrize("path,call", [
    ("glue/sst2", ("nyu-mll/glue", "sst2", "validation")),
    ("someorg/reviews:english", ("someorg/reviews", "english", "validation")),
    ("someorg/reviews", ("someorg/reviews", None, "validation")),
])
def test_hub_data_paths_reach_datasets_load_dataset(monkeypatch, path, call):
    import datasets

    calls = []

    def fake_load_dataset(repo, subset=None, split=None, **kwargs):
        calls.append((repo, subset, split))
        return datasets.Dataset.from_dict({"sentence": ["a fine film", "dull"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts, labels, source = read_split(DataSection(path=path), "validation", LABEL2ID)
    assert calls == [call]
    assert texts == ["a fine film", "dull"] and labels.tolist() == [1, 0] and source == f"{path} [validation]"


def test_unknown_split_of_a_hub_data_set_names_the_setting(monkeypatch):
    import datasets

    def fake_load_dataset(repo, subset=None, split=None, **kwargs):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"data.path=someorg/reviews: Unknown split \"dev\".*data.eval_split"):
        read_split(DataSection(path="someorg/reviews"), "dev", LABEL2ID)


def test_offline_hub_data_set_is_one_line_saying_what_to_pass():
    with pytest.raises(HubError) as error:
        read_split(DataSection(path="glue/sst2"), "train", LABEL2ID)
    message = str(error.value)
    assert "\n" not in message and "data.path=glue/sst2 is not a local folder or file, nor a hub data set" in message
    assert "HF_HUB_OFFLINE=1" in message and "pass data.path=<a GLUE folder with train.tsv and dev.tsv" in message


def test_without_an_address_for_the_hub_the_clients_go_offline_at_once(monkeypatch):
    import socket

    import datasets
    import datasets.config
    from huggingface_hub import constants

    import flaxsst.hub as hub

    def no_address(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    seen = []

    def fake_load_dataset(repo, subset=None, split=None, **kwargs):
        seen.append((constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_unreachable_host", None)
    monkeypatch.setattr(socket, "getaddrinfo", no_address)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(HubError, match=r"huggingface\.co has no address from here \(no network\?\) and it is not "
                                       r"in the local cache\); pass data\.path=<a GLUE folder"):
        read_split(DataSection(path="glue/sst2"), "validation", LABEL2ID)
    assert seen == [(True, True)]  # the cache only: no retries against a host that is not there


def test_glue_sst2_loads_offline_from_a_hub_style_datasets_cache(tmp_path):
    hub_dataset_cache(tmp_path / "datasets", "nyu-mll/glue", "sst2", {
        "train": {"sentence": ["a fine film ", "dull , dull "], "label": [1, 0], "idx": [0, 1]},
        "validation": {"sentence": ["great "], "label": [1], "idx": [0]},
    })
    code = ("from flaxsst.config import DataSection; from flaxsst.data import read_split; import json; "
            "print(json.dumps([read_split(DataSection(path='glue/sst2'), s, {'NEGATIVE': 0, 'POSITIVE': 1})[:2][0] "
            "for s in ('train', 'validation')]))")
    result = run(["-c", code], command_env(HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [["a fine film ", "dull , dull "], ["great "]]


def test_model_id_loads_offline_from_a_hub_style_cache_and_a_missing_one_is_one_line(tmp_path, tiny_model_dir):
    hub_model_cache(tmp_path / "hf" / "hub", "someorg/tiny-sst2", tiny_model_dir)
    env = command_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = run(["-m", "flaxsst.predict", "--model", "someorg/tiny-sst2"], env, stdin="a fine film\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [set(json.loads(line)) for line in result.stdout.splitlines()] == [{"label", "score"}]  # a JSON line per text
    result = run(["-m", "flaxsst.predict", "--model", "someorg/other"], env, stdin="a fine film\n")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--model=someorg/other is neither a local folder nor a hub model" in result.stderr


def test_model_ids_reach_snapshot_download_with_the_right_arguments(monkeypatch, tmp_path, tiny_model_dir):
    import huggingface_hub

    from flaxsst.hub import resolve_model_dir

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("distilbert-base-uncased-finetuned-sst-2-english", revision="abc",
                             cache_dir=tmp_path) == tiny_model_dir
    (repo_id, kwargs), = calls
    assert repo_id == "distilbert-base-uncased-finetuned-sst-2-english"
    assert kwargs == {"revision": "abc", "cache_dir": tmp_path, "allow_patterns": ["*.json", "*.safetensors", "vocab.txt"],
                      "local_files_only": False}
