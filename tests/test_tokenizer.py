"""Token ids against transformers' fast DistilBERT tokenizer and the pure-Python BertTokenizer."""

import csv

import pytest
import transformers

from flaxsst.errors import CheckpointError
from flaxsst.tokenizer import Tokenizer, pad_right
from tests.fixtures import data_subfolder

AWKWARD = [
    "",
    "   ",
    "Amélie 's café is NAÏVE , señor — déjà vu",
    "我喜欢这部电影 。 とても良い映画でした 영화",
    "great 😀👍🏽 fun ❤️",
    "control\x00chars\x07and\ttabs\r\nnew\x0blines\x1f",
    "zero\u200bwidth and com\u0301bining e\u0301",
    "UPPER lower MiXeD",
    "supercalifragilisticexpialidocious" * 5,
    "don't can't won't -- (parens) [brackets] {braces} $100 50%",
    " ".join(["word"] * 10_000),
    " ".join(f"token{i}" for i in range(3000)),
]


def _sst2_dev(test_data):
    with open(data_subfolder(test_data, "sst2") / "dev.tsv", encoding="utf-8", newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _reference_ids(reference, texts, max_length):
    return reference(texts, truncation=True, max_length=max_length)["input_ids"]


@pytest.fixture(scope="module")
def real_folder(test_data):
    return data_subfolder(test_data, "distilbert-base-uncased-finetuned-sst-2-english")


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_ids_equal_transformers_fast_and_slow_on_sst2_dev_and_awkward_text(test_data, real_folder, source):
    texts = _sst2_dev(test_data) + AWKWARD
    assert len(texts) == 872 + len(AWKWARD)
    ours = Tokenizer.from_file(real_folder / source, max_length=128).encode(texts)
    fast = transformers.DistilBertTokenizerFast.from_pretrained(real_folder)
    slow = transformers.BertTokenizerLegacy(vocab_file=str(real_folder / "vocab.txt"), do_lower_case=True)
    assert ours == _reference_ids(fast, texts, 128)
    assert ours == _reference_ids(slow, texts, 128)


def test_ids_equal_transformers_on_a_vocab_made_here(vocab_file):
    texts = ["the film was great !", "an awful , boring day", "xyzzy unknown words"] + AWKWARD
    ours = Tokenizer.from_file(vocab_file, max_length=32).encode(texts)
    fast = transformers.DistilBertTokenizerFast.from_pretrained(vocab_file.parent)
    assert ours == _reference_ids(fast, texts, 32)
    assert ours == _reference_ids(transformers.BertTokenizerLegacy(vocab_file=str(vocab_file)), texts, 32)


def test_truncation_keeps_the_final_sep(vocab_file):
    tok = Tokenizer.from_file(vocab_file, max_length=8)
    (ids,) = tok.encode(["the film " * 50])
    assert len(ids) == 8 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert tok.encode([""]) == [[tok.cls_id, tok.sep_id]]


def test_pad_right_pads_with_a_mask_and_padding_rows():
    ids, mask = pad_right([[2, 7, 3], [2, 3]], 3, 4, pad_id=0)
    assert ids.tolist() == [[2, 7, 3, 0], [2, 3, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="row 0 has 3 tokens, more than the padded length 2"):
        pad_right([[2, 7, 3]], 1, 2, pad_id=0)


def test_vocab_without_special_tokens_is_named(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[SEP\]', '\[PAD\]', '\[CLS\]', '\[MASK\]'\]"):
        Tokenizer.from_file(tmp_path / "vocab.txt")


def test_folder_without_tokenizer_files_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="has no tokenizer: neither tokenizer.json nor vocab.txt"):
        Tokenizer.from_pretrained(tmp_path)
