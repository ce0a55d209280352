"""Reading, checking, tokenizing and batching SST-2."""

import numpy as np
import pytest

from flaxsst.config import DataSection
from flaxsst.data import (
    DataError,
    check_distinct_splits,
    load_tokenized,
    make_batch,
    read_split,
    steps_per_epoch,
    train_batch_indices,
)
from flaxsst.tokenizer import Tokenizer
from tests.fixtures import data_subfolder

LABEL2ID = {"NEGATIVE": 0, "POSITIVE": 1}


def test_real_glue_folder_reads_every_row(test_data):
    data = DataSection(path=str(data_subfolder(test_data, "sst2")))
    texts, labels, source = read_split(data, "train", LABEL2ID)
    assert len(texts) == 67_349 and int(labels.sum()) == 37_569 and source.endswith("train.tsv")
    dev_texts, dev_labels, _ = read_split(data, "validation", LABEL2ID)
    assert len(dev_texts) == 872 and int(dev_labels.sum()) == 444
    assert dev_texts[0] == "it 's a charming and often affecting journey . "


def test_recipe_has_6315_steps_and_trains_the_last_partial_batch(test_data):
    assert steps_per_epoch(67_349, 32) * 3 == 6_315
    n, batch = 67_349, 32
    seen = np.concatenate([train_batch_indices(step, n, batch, seed=42) for step in range(steps_per_epoch(n, batch))])
    assert np.array_equal(np.sort(seen), np.arange(n))  # every example once per epoch
    last = train_batch_indices(2104, n, batch, seed=42)
    assert len(last) == 21
    epoch_two = train_batch_indices(2105, n, batch, seed=42)
    assert not np.array_equal(epoch_two, train_batch_indices(0, n, batch, seed=42))  # reshuffled per epoch
    assert np.array_equal(epoch_two, train_batch_indices(2105, n, batch, seed=42))  # and reproducible


def test_padding_rows_of_a_partial_batch_carry_no_weight(vocab_file, tmp_path):
    tok = Tokenizer.from_file(vocab_file, max_length=16)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.tsv").write_text("sentence\tlabel\nthe film was great \t1\nawful \t0\nbad day \t0\n")
    split = load_tokenized(DataSection(path=str(tmp_path / "d"), max_seq_length=16), "train", tok, LABEL2ID, tmp_path / "cache")
    batch = make_batch(split, np.array([2, 0]), rows=4, buckets=[8, 16], max_seq_length=16)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["weights"].tolist() == [1, 1, 0, 0] and batch["labels"].tolist() == [0, 1, 0, 0]
    assert batch["attention_mask"][2:].sum() == 0
    assert batch["input_ids"][1, :6].tolist() == tok.encode(["the film was great"])[0]


def _write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows), encoding="utf-8")


def test_missing_text_names_file_and_row(tmp_path):
    (tmp_path / "glue").mkdir()
    _write_tsv(tmp_path / "glue" / "train.tsv", [("good", 1), ("", 0), ("bad", 0)])
    with pytest.raises(DataError, match=r"train\.tsv: row 2 \(line 3\): missing text in column 'sentence'"):
        read_split(DataSection(path=str(tmp_path / "glue")), "train", LABEL2ID)


def test_label_outside_id2label_names_file_row_and_value(tmp_path):
    (tmp_path / "glue").mkdir()
    _write_tsv(tmp_path / "glue" / "dev.tsv", [("good", 1), ("fine", 1), ("bad", 7)])
    with pytest.raises(DataError, match=r"dev\.tsv: row 3 \(line 4\): label 7 is not one of the model's labels"):
        read_split(DataSection(path=str(tmp_path / "glue")), "validation", LABEL2ID)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_any_table_file_with_named_columns(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"review": ["a fine film", "dull , dull", "great"], "stars": ["POSITIVE", "NEGATIVE", "POSITIVE"]})
    path = tmp_path / f"reviews{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    data = DataSection(path=str(tmp_path), text_column="review", label_column="stars")
    texts, labels, _ = read_split(data, str(path), LABEL2ID)
    assert texts == ["a fine film", "dull , dull", "great"] and labels.tolist() == [1, 0, 1]


def test_missing_column_is_named(tmp_path):
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"no column 'sentence'; columns are \['text', 'label'\] \(set data\.text_column=<one of them>\)"):
        read_split(DataSection(path=str(tmp_path / "glue")), "train", LABEL2ID)


def test_an_unlabelled_split_says_it_has_no_labels_instead_of_offering_its_index_as_one(tmp_path):
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tuneasy mishmash of styles\n1\ta fine film\n")
    with pytest.raises(DataError) as caught:
        read_split(DataSection(path=str(tmp_path)), "test", LABEL2ID)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'test.tsv'} has no labels: no column 'label', only ['index', 'sentence']")
    assert "data.eval_split=validation" in message and "label_column" not in message


def test_a_missing_label_column_offers_the_other_columns(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tstars\na fine film\t1\n")
    with pytest.raises(DataError, match=r"no column 'label'; columns are \['sentence', 'stars'\] "
                                        r"\(set data\.label_column=<one of \['stars'\]>\)"):
        read_split(DataSection(path=str(tmp_path)), "validation", LABEL2ID)


def test_one_file_is_not_both_the_train_and_the_eval_split(tmp_path):
    train, dev = tmp_path / "reviews.tsv", tmp_path / "held_out.tsv"
    _write_tsv(train, [("good", 1), ("bad", 0)])
    _write_tsv(dev, [("fine", 1)])
    with pytest.raises(DataError, match=r"data\.path=.*reviews\.tsv is one file, which would be both the train and "
                                        r"the eval split; name the eval file with data\.eval_split=PATH"):
        check_distinct_splits(DataSection(path=str(train)))
    with pytest.raises(DataError, match=r"data\.train_split=train and data\.eval_split=train both read .*train\.tsv"):
        check_distinct_splits(DataSection(path=str(_glue_folder(tmp_path)), eval_split="train"))
    with pytest.raises(DataError, match=r"data\.eval_split=.*nosuch\.tsv: .*nosuch\.tsv does not exist"):
        check_distinct_splits(DataSection(path=str(train), eval_split=str(tmp_path / "nosuch.tsv")))
    split = DataSection(path=str(train), eval_split=str(dev))
    check_distinct_splits(split)  # the file trains, the named file evaluates
    assert read_split(split, split.train_split, LABEL2ID)[0] == ["good", "bad"]
    assert read_split(split, split.eval_split, LABEL2ID)[0] == ["fine"]


def test_a_header_without_rows_is_named(tmp_path):
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "train.tsv").write_text("sentence\tlabel\n\n")
    with pytest.raises(DataError, match=r"train\.tsv has a header but no rows"):
        read_split(DataSection(path=str(tmp_path / "glue")), "train", LABEL2ID)


def _glue_folder(tmp_path):
    folder = tmp_path / "glue"
    folder.mkdir()
    _write_tsv(folder / "train.tsv", [("good", 1)])
    _write_tsv(folder / "dev.tsv", [("fine", 1)])
    return folder


def test_tokenized_split_is_cached_and_equal(vocab_file, tmp_path):
    tok = Tokenizer.from_file(vocab_file, max_length=16)
    data = DataSection(path="synthetic", synthetic_train_size=50, max_seq_length=16)
    first = load_tokenized(data, "train", tok, LABEL2ID, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    second = load_tokenized(data, "train", tok, LABEL2ID, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first.token_ids, second.token_ids))
    texts, _, _ = read_split(data, "train", LABEL2ID)
    assert [list(t) for t in first.token_ids] == tok.encode(texts)
