"""BERT WordPiece tokenization (uncased) through the ``tokenizers`` library.

Ids equal transformers' ``DistilBertTokenizerFast`` and the pure-Python
``BertTokenizer``: ``[CLS] tokens [SEP]``, truncated to ``max_length`` with the
final ``[SEP]`` kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from flaxsst.errors import CheckpointError, ConfigError
from flaxsst.hub import resolve_model_dir

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}


def _wordpiece_from_vocab(vocab_path: Path, lowercase: bool) -> _RustTokenizer:
    vocab: dict[str, int] = {}
    try:
        with open(vocab_path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                vocab[line.rstrip("\n")] = index
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{vocab_path}: cannot be read as a WordPiece vocabulary ({e})") from None
    missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise CheckpointError(f"{vocab_path} lacks the special tokens {missing}")
    tok = _RustTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _read_tokenizer_json(path: Path) -> _RustTokenizer:
    try:
        return _RustTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def pad_right(ids: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` right-padded into ``rows`` rows of ``length`` (rows past ``len(ids)`` are all padding):
    ``(input_ids, attention_mask)`` each ``[rows, length]`` int32."""
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for row, seq in enumerate(ids):
        if len(seq) > length:
            raise ValueError(f"row {row} has {len(seq)} tokens, more than the padded length {length}")
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


class Tokenizer:
    """Text -> token ids for DistilBERT/BERT uncased models.

    >>> tok = Tokenizer.from_pretrained("path/to/model")       # tokenizer.json, or vocab.txt alone
    >>> tok.encode(["a fine film"])                              # [[101, 1037, 2986, 2143, 102]]
    """

    def __init__(self, backend: _RustTokenizer, max_length: int = 512, lowercase: bool = True):
        if max_length < 2:
            raise ConfigError(f"max_length={max_length} leaves no room for [CLS] and [SEP]; use at least 2")
        self.backend = backend
        self.max_length = max_length
        self.lowercase = lowercase
        backend.no_padding()
        backend.enable_truncation(max_length)
        self.pad_id = self._id("[PAD]")
        self.cls_id = self._id("[CLS]")
        self.sep_id = self._id("[SEP]")

    def _id(self, token: str) -> int:
        index = self.backend.token_to_id(token)
        if index is None:
            raise CheckpointError(f"the tokenizer's vocabulary has no {token} token")
        return index

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 512) -> "Tokenizer":
        """From a ``tokenizer.json`` or a ``vocab.txt``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file {path} does not exist")
        if path.name.endswith(".json"):
            return cls(_read_tokenizer_json(path), max_length)
        return cls(_wordpiece_from_vocab(path, lowercase=True), max_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, max_length: int = 512, **hub_kwargs) -> "Tokenizer":
        """From a HF model folder or hub id: ``tokenizer.json`` if present, else ``vocab.txt``."""
        return cls.from_folder(resolve_model_dir(name_or_path, **hub_kwargs), max_length)

    @classmethod
    def from_folder(cls, folder: Path, max_length: int = 512) -> "Tokenizer":
        """``from_pretrained`` of a local model folder already resolved."""
        folder = Path(folder)
        lowercase = True
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                lowercase = json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case", True)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise CheckpointError(f"{config_path}: not a valid tokenizer config ({e})") from None
        if (folder / TOKENIZER_FILE).is_file():
            return cls(_read_tokenizer_json(folder / TOKENIZER_FILE), max_length, lowercase)
        if (folder / VOCAB_FILE).is_file():
            return cls(_wordpiece_from_vocab(folder / VOCAB_FILE, lowercase), max_length, lowercase)
        raise CheckpointError(
            f"{folder} has no tokenizer: neither {TOKENIZER_FILE} nor {VOCAB_FILE}; found {sorted(p.name for p in folder.iterdir())}"
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """``[CLS] ... [SEP]`` ids per text, each at most ``max_length`` long."""
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = _RustTokenizer.from_str(self.backend.to_str())
        saved.no_truncation()
        saved.save(str(out_dir / TOKENIZER_FILE))
        vocab = sorted(self.backend.get_vocab().items(), key=lambda item: item[1])
        (out_dir / VOCAB_FILE).write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
        config = {
            "tokenizer_class": "DistilBertTokenizer",
            "do_lower_case": self.lowercase,
            "model_max_length": 512,
            "clean_up_tokenization_spaces": True,
            **SPECIAL_TOKENS,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")
