"""Every bad input a user can give train.py, evaluate.py and ``python -m flaxsst.predict``: exit 2 and
one line on stderr, ``error: ...`` naming the file, line, key or value, with no traceback; checked
before anything compiles. ``--debug`` shows the traceback instead."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.commands import assert_one_line_error, command_env, run, start

TINY = ["--config", "conf/tiny.yaml"]


def _glue(folder: Path, train: bytes = b"sentence\tlabel\ngood film \t1\nbad film \t0\n",
          dev: bytes = b"sentence\tlabel\nfine \t1\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes(train)
    (folder / "dev.tsv").write_bytes(dev)
    return folder


def _model(tmp: Path, model: Path, damage=None) -> Path:
    copy = tmp / "model"
    shutil.copytree(model, copy)
    if damage:
        damage(copy)
    return copy


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


EMPTY = b""
NOT_UTF8 = b"sentence\tlabel\ngood \t1\ncaf\xe9 \t0\n"
BAD_LABEL = b"sentence\tlabel\ngood \t1\nbad \t7\n"
NO_SENTENCE = b"text\tlabel\ngood \t1\n"
GARBAGE_JSON = '{"dim": 32,,}'
ONE_RECORD = '{"kind": "train", "step": 1, "loss": 0.69}\n'


def _train(t: Path, m: Path, *overrides: str) -> list[str]:
    return ["train.py", *TINY, "--workdir", str(t / "w"), *overrides]


def _train_on(t: Path, m: Path, train_tsv: bytes) -> list[str]:
    return _train(t, m, f"model.pretrained={m}", f"data.path={_glue(t / 'glue', train=train_tsv)}")


# (id, build(tmp, model) -> (argv, stdin), the texts the one line must contain)
CASES = [
    ("config-missing", lambda t, m: (["train.py", "--config", "conf/nope.yaml", "--workdir", str(t / "w")], None),
     ["config file conf/nope.yaml does not exist"]),
    ("config-yaml-syntax", lambda t, m: (["train.py", "--config", str(_write(t / "bad.yaml", "train:\n  seed: 1\n   warmup_steps: 3\n")),
                                          "--workdir", str(t / "w")], None),
     ["bad.yaml:3:", "invalid YAML"]),
    ("config-unknown-key-in-file", lambda t, m: (["train.py", "--config", str(_write(t / "k.yaml", "train:\n  warmup: 3\n")),
                                                  "--workdir", str(t / "w")], None),
     ["k.yaml", "unknown key 'train.warmup'", "did you mean train.warmup_steps?"]),
    ("override-unknown-key", lambda t, m: (_train(t, m, "train.lr=1e-3"), None),
     ["override train.lr=1e-3", "unknown key 'train.lr'", "did you mean train.learning_rate?"]),
    ("override-wrong-type", lambda t, m: (_train(t, m, "train.global_batch_size=thirty-two"), None),
     ["train.global_batch_size", "'thirty-two'"]),
    ("override-not-key-value", lambda t, m: (_train(t, m, "train.seed"), None),
     ["override 'train.seed' is not of the form key=value"]),
    ("override-bad-value", lambda t, m: (_train(t, m, "train.keep_checkpoints=0"), None),
     ["'train.keep_checkpoints' = 0"]),
    ("argument-missing", lambda t, m: (["train.py", *TINY], None), ["--workdir"]),
    ("batch-over-devices", lambda t, m: (_train(t, m, "train.global_batch_size=12"), None),
     ["train.global_batch_size=12 does not divide evenly over 8 devices"]),
    ("sequence-over-random-init-positions", lambda t, m: (_train(t, m, "data.max_seq_length=100000"), None),
     ["data.max_seq_length=100000", "max_position_embeddings=512"]),
    ("sequence-over-checkpoint-positions", lambda t, m: (_train(t, m, f"model.pretrained={m}", "data.max_seq_length=100000"), None),
     ["data.max_seq_length=100000", "max_position_embeddings=128", "tiny-hf"]),
    ("data-folder-missing", lambda t, m: (_train(t, m, f"model.pretrained={m}", f"data.path={t / 'nope'}"), None),
     ["data.path=", "nope does not exist"]),
    ("data-hub-offline", lambda t, m: (_train(t, m, f"model.pretrained={m}", "data.path=glue/sst2"), None),
     ["data.path=glue/sst2 is not a local folder or file, nor a hub data set", "HF_HUB_OFFLINE=1",
      "pass data.path=<a GLUE folder"]),
    ("model-hub-offline", lambda t, m: (["train.py", "--config", "conf/sst2.yaml", "--workdir", str(t / "w"),
                                         f"data.path={_glue(t / 'glue')}"], None),
     ["model.pretrained=distilbert-base-uncased is neither a local folder nor a hub model", "pass model.pretrained=<a local folder"]),
    ("data-empty-train-file", lambda t, m: (_train_on(t, m, EMPTY), None), ["train.tsv is empty"]),
    ("data-header-only", lambda t, m: (_train_on(t, m, b"sentence\tlabel\n"), None), ["train.tsv has a header but no rows"]),
    ("data-one-file-for-both-splits", lambda t, m: (_train(t, m, f"model.pretrained={m}", f"data.path={_glue(t / 'glue') / 'train.tsv'}"), None),
     ["train.tsv is one file, which would be both the train and the eval split", "data.eval_split=PATH"]),
    ("workdir-is-a-file", lambda t, m: (["train.py", *TINY, "--workdir", str(_write(t / "notes.txt", "x"))], None),
     ["--workdir=", "notes.txt is a file, not a folder"]),
    ("data-not-utf8", lambda t, m: (_train_on(t, m, NOT_UTF8), None), ["train.tsv: line 3 is not UTF-8"]),
    ("data-bad-label", lambda t, m: (_train_on(t, m, BAD_LABEL), None), ["train.tsv: row 2 (line 3): label 7 is not one of the model's labels"]),
    ("data-missing-column", lambda t, m: (_train_on(t, m, NO_SENTENCE), None), ["train.tsv: no column 'sentence'"]),
    ("model-truncated-weights", lambda t, m: (_train(t, m, f"model.pretrained={_model(t, m, lambda d: _truncate(d / 'model.safetensors'))}"), None),
     ["model.safetensors is not a readable safetensors file"]),
    ("model-garbage-config", lambda t, m: (_train(t, m, f"model.pretrained={_model(t, m, lambda d: _write(d / 'config.json', GARBAGE_JSON))}"), None),
     ["config.json:1: not valid JSON"]),
    ("model-without-tokenizer", lambda t, m: (_train(t, m, f"model.pretrained={_model(t, m, lambda d: [(d / n).unlink() for n in ('tokenizer.json', 'vocab.txt')])}"), None),
     ["has no tokenizer: neither tokenizer.json nor vocab.txt"]),
    ("evaluate-model-missing", lambda t, m: (["evaluate.py", "--model", str(t / "nope"), "--config", "conf/tiny.yaml"], None),
     ["--model=", "nope does not exist"]),
    ("evaluate-model-garbage-config", lambda t, m: (["evaluate.py", "--model", str(_model(t, m, lambda d: _write(d / "config.json", "[1, 2"))),
                                                     "--config", "conf/tiny.yaml"], None),
     ["config.json:1: not valid JSON"]),
    ("evaluate-output-is-a-file", lambda t, m: (["evaluate.py", "--model", str(m), "--config", "conf/tiny.yaml",
                                                 "--output", str(_write(t / "notes.txt", "x"))], None),
     ["--output=", "notes.txt is a file, not a folder"]),
    ("probe-output-is-a-file", lambda t, m: (["-m", "flaxsst.probe", "--model", str(m), "--output", str(_write(t / "notes.txt", "x"))], None),
     ["--output=", "notes.txt is a file, not a folder"]),
    ("probe-fillers-not-text", lambda t, m: (["-m", "flaxsst.probe", "--model", str(m), "--output", str(t / "p"),
                                              "--fillers", str(_write_bytes(t / "names.txt", b"Ann\nB\xffb\n"))], None),
     ["--fillers", "names.txt: line 2 is not UTF-8 text"]),
    ("probe-template-other-placeholder", lambda t, m: (["-m", "flaxsst.probe", "--model", str(m), "--output", str(t / "p"),
                                                        "--templates", "{X} met {Y}."], None),
     ["template '{X} met {Y}.' holds {Y}; only {X} is filled in"]),
    ("plot-out-under-a-file", lambda t, m: (["-m", "flaxsst.plot", str(_write(t / "metrics.jsonl", ONE_RECORD).parent), "--out", str(_write(t / "notes.txt", "x") / "c.png")], None),
     ["--out folder=", "notes.txt is a file"]),
    ("workdir-empty", lambda t, m: (["train.py", *TINY, "--workdir", ""], None), ["--workdir is empty"]),
    ("synthetic-one-label", lambda t, m: (["train.py", *TINY, "--workdir", str(t / "w"), "model.labels=[A]"], None),
     ["data.path=synthetic has 2 classes", "1 label ['A']", "set model.labels to two names"]),
    ("evaluate-model-empty", lambda t, m: (["evaluate.py", "--model", "", "--config", "conf/tiny.yaml"], None),
     ["--model is empty"]),
    ("config-not-utf8", lambda t, m: (["train.py", "--config", str(_write_bytes(t / "c.yaml", b"train:\n  seed: \xfb1\n")),
                                       "--workdir", str(t / "w")], None), ["c.yaml: line 2 is not UTF-8 text (byte 0xfb at offset 15)"]),
    ("plot-no-records", lambda t, m: (["-m", "flaxsst.plot", str(_write(t / "metrics.jsonl", "not json\n").parent)], None),
     ["metrics.jsonl holds no train or eval records yet"]),
    ("plot-out-not-an-image", lambda t, m: (["-m", "flaxsst.plot", str(_write(t / "metrics.jsonl", ONE_RECORD).parent), "--out", str(t / "c.txt")], None),
     ["--out=", "c.txt: name a file ending in an image format"]),
    ("aot-hlo-is-a-file", lambda t, m: (["-m", "flaxsst.aot", *TINY, "--topology", "v5e:2x2", "--hlo", str(_write(t / "notes.txt", "x"))], None),
     ["--hlo=", "notes.txt is a file, not a folder"]),
    ("aot-one-file-for-both-splits", lambda t, m: (["-m", "flaxsst.aot", *TINY, "--topology", "v5e:2x2",
                                                    f"data.path={_glue(t / 'glue') / 'train.tsv'}"], None),
     ["train.tsv is one file, which would be both the train and the eval split"]),
    ("predict-model-missing", lambda t, m: (["-m", "flaxsst.predict", "--model", str(t / "nope")], "a fine film\n"),
     ["--model=", "nope does not exist"]),
    ("predict-model-hub-offline", lambda t, m: (["-m", "flaxsst.predict", "--model", "someorg/not-cached"], "x\n"),
     ["--model=someorg/not-cached is neither a local folder nor a hub model"]),
    ("predict-bad-json", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m)], '{"input_data": ["a",'),
     ["stdin starts with '{' but is not valid JSON"]),
    ("predict-non-string", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m)], json.dumps({"input_data": ["x", None]})),
     ["stdin: input 1 is NoneType, expected str"]),
    ("predict-wrong-key", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m)], json.dumps({"inputs": ["x"]})),
     ['must be {"input_data": [...]}', "['inputs']"]),
    ("predict-max-length", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m), "--max-length", "100000"], "x\n"),
     ["max_length=100000 must lie in [2, 128]"]),
    ("predict-dtype", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m), "--dtype", "float17"], "x\n"),
     ["unknown dtype 'float17'"]),
    ("predict-input-missing", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m), "--input", str(t / "nope.txt")], None),
     ["--input", "nope.txt: cannot be read"]),
    ("predict-input-not-utf8", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m), "--input",
                                              str(_write_bytes(t / "texts.txt", b"a fine film\ncaf\xe9\n"))], None),
     ["--input", "texts.txt: line 2 is not UTF-8 text (byte 0xe9 at offset 15)"]),
    ("predict-lone-surrogate", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m)], '{"input_data": ["ok", "a \\ud800 b"]}'),
     ["stdin: input 1 is not Unicode text: a lone surrogate '\\ud800' at character 2"]),
    ("predict-nested-json", lambda t, m: (["-m", "flaxsst.predict", "--model", str(m)], "[" * 100000 + "]" * 100000),
     ["stdin: JSON nested too deeply"]),
]


@pytest.mark.parametrize("build,named", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_it(tmp_path, tiny_model_dir, build, named):
    argv, stdin = build(tmp_path, tiny_model_dir)
    result = run(argv, command_env(), stdin=stdin, timeout=300)
    assert_one_line_error(result, *named)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_refusal_of_the_file_system_is_one_line_naming_the_path(tmp_path, capsys):
    from flaxsst import cli

    def main(args):
        open(tmp_path, "w")  # a folder: IsADirectoryError

    assert cli.run(main, cli.ArgumentParser(prog="x"), []) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == f"error: {tmp_path}: Is a directory\n"


def test_overrides_may_come_before_the_flags(tmp_path):
    result = run(["train.py", "--config", "conf/tiny.yaml", "train.lr=1e-3", "--workdir", str(tmp_path / "w")], command_env())
    assert_one_line_error(result, "override train.lr=1e-3", "did you mean train.learning_rate?")


def test_debug_shows_the_traceback(tmp_path):
    result = run(["train.py", *TINY, "--workdir", str(tmp_path / "w"), "--debug", "train.lr=1e-3"], command_env())
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr
    result = run(["train.py", *TINY, "--workdir", str(tmp_path / "w"), "train.lr=1e-3"], command_env(FLAXSST_DEBUG="1"))
    assert "Traceback" in result.stderr


def test_ctrl_c_in_a_long_command_is_one_line_and_exit_75(tmp_path):
    """Ctrl-C while ``flaxsst.aot`` compiles DistilBERT-base for a TPU slice (a minute's work): one
    line, the exit code of an interrupted run, no traceback, and no crash of XLA's threads."""
    # As in a terminal: a job a shell starts in the background (as CI may run the tests) inherits SIGINT
    # ignored, and Python then takes no Ctrl-C; the command gets Python's own SIGINT handler back first.
    sigint = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "runpy.run_module('flaxsst.aot', run_name='__main__', alter_sys=True)")
    process = start(["-c", sigint, "--config", "conf/sst2.yaml", "--topology", "v5e:2x2", "model.pretrained=",
                     "model.dtype=bfloat16", "data.path=synthetic"], command_env(devices=1))
    seen = []
    for line in process.stderr:  # the compiling has begun
        seen.append(line)
        if line.startswith("compiling the train program"):
            break
    process.send_signal(signal.SIGINT)  # Python acts on it once XLA returns from the program it compiles
    _, err = process.communicate(timeout=600)
    assert process.returncode == 75, "".join(seen)[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; nothing was saved, rerun the same command"
    assert "Traceback" not in err
