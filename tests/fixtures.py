"""Builders for test inputs: tiny models saved by transformers, a small vocabulary, sentences."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

WORDS = (
    "the a an and of to is was it this that film movie story good great fine amazing wonderful "
    "bad awful boring dull terrible day today not very funny sad love hate best worst series "
    "events unfortunate charming often affecting journey bleak desperate ! . , ' ? - s"
).split()


def make_vocab(path: Path) -> Path:
    """``[PAD] [UNK] [CLS] [SEP] [MASK]``, the words above, single letters and ``##`` pieces."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + [f"##{c}" for c in letters]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in dict.fromkeys(tokens)), encoding="utf-8")
    return path


def tiny_hf_config(vocab_size: int, **kwargs):
    import transformers

    defaults = dict(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    defaults.update(kwargs)
    return transformers.DistilBertConfig(**defaults)


def tiny_hf_folder(out: Path, vocab_file: Path, seed: int = 0, **config_kwargs) -> Path:
    """``save_pretrained`` of a random tiny HF DistilBERT classifier, plus tokenizer files."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab_size = len(vocab_file.read_text(encoding="utf-8").splitlines())
    model = transformers.DistilBertForSequenceClassification(tiny_hf_config(vocab_size, **config_kwargs)).eval()
    model.save_pretrained(out)
    shutil.copy(vocab_file, out / "vocab.txt")
    transformers.DistilBertTokenizerFast.from_pretrained(out).save_pretrained(out)
    return out


def sentences() -> list[str]:
    """SST-2-like sentences of varied length (padded batches have real masking to do)."""
    return [
        "it 's a charming and often affecting journey . ",
        "unflinchingly bleak and desperate ",
        "the film was great",
        "a",
        "this is the worst , most boring movie of the series , and not funny at all ! " * 2,
        "today was an amazing day !",
    ]


def random_ids(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with [CLS]=101-style first token and right padding of random length per row."""
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    lengths = rng.integers(2, seq + 1, size=batch)
    lengths[0] = seq
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = 0
    return ids, mask


def hub_model_cache(cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub writes for a model: blobs by hash, snapshot links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / file.name)
    return snapshot


def hub_dataset_cache(cache: Path, repo_id: str, subset: str, splits: dict[str, dict[str, list]]) -> Path:
    """The layout ``datasets`` leaves in its cache (HF_DATASETS_CACHE) after loading a hub data set
    online once: ``org___name/subset/0.0.0/<hash>/<name>-<split>.arrow`` and ``dataset_info.json``.
    Offline, ``datasets.load_dataset(repo_id, subset)`` reads it from there."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    sources = cache / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, columns in splits.items():
        files[split] = str(sources / f"{split}.jsonl")
        datasets.Dataset.from_dict(columns).to_json(files[split])
    build = cache / "build"
    Json(cache_dir=str(build), dataset_name=name, config_name=subset, data_files=files).download_and_prepare()
    (prepared,) = (build / name).glob(f"{subset}-*/0.0.0")
    target = cache / repo_id.replace("/", "___") / subset / "0.0.0" / "0123456789abcdef"
    target.mkdir(parents=True)
    for file in prepared.glob("*"):
        if file.suffix in (".arrow", ".json"):
            shutil.move(str(file), target / file.name)
    shutil.rmtree(build)
    return target


def data_subfolder(test_data: Path, name: str) -> Path:
    """``FLAXSST_TEST_DATA/name``; where it is missing the test is skipped, naming the folder (an
    offline machine may hold only some of them)."""
    import pytest

    folder = test_data / name
    if not folder.is_dir():
        pytest.skip(f"FLAXSST_TEST_DATA={test_data} has no {name}/ (see README 'Test data')")
    return folder
