"""Test set-up: 8 fake CPU devices for multi-device code, and the shared real data.

XLA_FLAGS and JAX_PLATFORMS must be set before jax is first imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("FLAXSST_COMPILATION_CACHE", "0")
os.environ.setdefault("FLAXSST_PROGRAM_STORE", "0")  # a test that starts from stored programs turns it on
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures import make_vocab, tiny_hf_folder  # noqa: E402,F401


def _data_dir() -> Path | None:
    value = os.environ.get("FLAXSST_TEST_DATA")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real files (SST-2, MiniLM-L6, tokenizer files); see README 'Test data'."""
    folder = _data_dir()
    if folder is None:
        pytest.skip("FLAXSST_TEST_DATA is not set: the real SST-2 / MiniLM / tokenizer files are needed")
    if not folder.is_dir():
        pytest.fail(f"FLAXSST_TEST_DATA={folder} is not a folder")
    return folder


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory) -> Path:
    """A small WordPiece vocabulary made here (no shared data needed)."""
    return make_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, vocab_file) -> Path:
    """A tiny DistilBertForSequenceClassification saved by transformers, with tokenizer files."""
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-hf"), vocab_file)
