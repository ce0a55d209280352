"""End-to-end training runs: resume, interruption, NaN, and train.py / evaluate.py on conf/tiny.yaml."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from flaxsst import Classifier
from flaxsst.config import ConfigError, load_train_config
from flaxsst.errors import Interrupted
from flaxsst.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic_train_size=300", "data.synthetic_eval_size=64", "train.num_epochs=2",
         "train.checkpoint_every_steps=4", "train.log_every_steps=2", "model.config.dropout=0.1",
         "model.config.attention_dropout=0.1"]


def _config(*overrides):
    return load_train_config(ROOT / "conf" / "tiny.yaml", list(SMALL) + list(overrides))


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_and_rerun_training_equals_an_uninterrupted_run_bitwise(tmp_path):
    uninterrupted = Trainer(_config(), tmp_path / "a").run()
    assert uninterrupted.finished and uninterrupted.step == 20  # ceil(300 / 32) = 10 steps x 2 epochs

    def interrupt_at_7(trainer, step):
        if step == 7:
            trainer.request_stop()

    first = Trainer(_config(), tmp_path / "b", on_step=interrupt_at_7).run()
    assert not first.finished and first.step == 7
    assert (tmp_path / "b" / "checkpoints" / "7").is_dir()
    resumed = Trainer(_config(), tmp_path / "b").run()
    assert resumed.finished and resumed.step == 20
    _assert_bitwise_equal(uninterrupted.params, resumed.params)
    assert resumed.best_accuracy == uninterrupted.best_accuracy
    with pytest.raises(ConfigError, match=r"holds a run started with another config \(train.seed: 0 -> 1\)"):
        Trainer(_config("train.seed=1"), tmp_path / "b").run()


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    def poison(trainer, step):
        if step == 5:
            trainer.state = trainer.state.replace(
                params=jax.tree_util.tree_map(lambda x: x * np.nan, trainer.state.params))

    with pytest.raises(FloatingPointError, match=r"loss nan, gradient norm nan at step 6; last good checkpoint: .*checkpoints/4;"):
        Trainer(_config(), tmp_path, on_step=poison).run()


def _python(*args, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900, **kwargs)


def test_train_py_on_tiny_yaml_end_to_end_learns_and_leaves_every_artifact(tmp_path):
    workdir = tmp_path / "tiny"
    result = _python("train.py", "--config", "conf/tiny.yaml", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    # Without a terminal: what compiles, a line per log_every_steps (20), every evaluation (per epoch: 63 steps).
    assert "compiling 4 programs (train at lengths 16, 32, evaluation at 16, 32)" in result.stderr
    step_lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == [f"{s}/252" for s in list(range(20, 252, 20)) + [252]]
    assert all(k in step_lines[0] for k in ("loss", "accuracy", "lr", "ex/s", "ETA"))
    assert [line.split()[3] for line in result.stderr.splitlines() if line.startswith("eval at step")] == \
        ["63", "126", "189", "252"]
    assert "the exported checkpoint, step" in result.stdout and "Very slow compile" not in result.stderr
    assert (workdir / "config.yaml").is_file()
    assert load_train_config(workdir / "config.yaml") == load_train_config(ROOT / "conf" / "tiny.yaml")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 252
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"run", "train", "eval"}
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((workdir / "eval_results.json").read_text())
    assert set(results) >= {"accuracy", "precision", "recall", "f1", "auc", "loss", "confusion_matrix"}
    assert results["accuracy"] >= 0.95 and results["num_examples"] == 400  # a tiny model learns the synthetic task

    export = workdir / "export"
    hf = transformers.DistilBertForSequenceClassification.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    texts = ["the film was great and charming .", "a boring , awful story ."]
    with torch.no_grad():
        hf_labels = hf(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    predictions = Classifier.from_pretrained(export)(texts)
    assert [p["label"] for p in predictions] == [hf.config.id2label[i] for i in hf_labels] == ["POSITIVE", "NEGATIVE"]

    evaluated = _python("evaluate.py", "--model", str(export), "--output", str(tmp_path / "eval"),
                        "--config", "conf/tiny.yaml")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy" in evaluated.stdout and "confusion" in evaluated.stdout
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["accuracy"] == results["accuracy"] and again["confusion_matrix"] == results["confusion_matrix"]

    plotted = _python("-m", "flaxsst.plot", str(workdir), "--out", str(tmp_path / "again.png"))
    assert plotted.returncode == 0 and (tmp_path / "again.png").is_file()


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", TQDM_DISABLE="1")
    process = subprocess.Popen(
        [sys.executable, "train.py", "--config", "conf/tiny.yaml", "--workdir", str(workdir), "train.num_epochs=500",
         "train.checkpoint_every_steps=100000", "train.log_every_steps=5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    def trained():  # a train record: the loop runs
        path = workdir / "metrics.jsonl"
        return path.is_file() and '"kind": "train"' in path.read_text()

    while not trained():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-3000:]  # interrupted: rerun to resume
    assert "interrupted: checkpoint saved at step" in out + err
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and not (workdir / "export").exists()


def test_a_stop_whose_exception_python_dropped_still_ends_the_run_before_the_first_step(tmp_path, monkeypatch):
    """A signal that lands while Python runs a callback of its own (a GC callback) has its exception
    dropped; the run still ends before training, as it does when the exception gets through."""
    prepare = Trainer._prepare

    def prepare_then_signal(self, *args, **kwargs):
        state = prepare(self, *args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler raises here...
            time.sleep(1)
        except Interrupted:
            pass  # ...and the exception is lost, as in a callback
        return state

    monkeypatch.setattr(Trainer, "_prepare", prepare_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted before the first step; nothing was trained"):
        Trainer(_config(), tmp_path / "run").run()
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    assert signal.getsignal(signal.SIGTERM) == before  # the trainer's handler is gone with the run


def test_a_signal_after_the_last_step_says_so_and_a_rerun_exports(tmp_path, monkeypatch):
    export = Trainer._export

    def signal_then_export(self, best_step):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return export(self, best_step)

    monkeypatch.setattr(Trainer, "_export", signal_then_export)
    with pytest.raises(Interrupted, match=r"interrupted after the last step; its checkpoint is saved in .*20.* rerun"):
        Trainer(_config(), tmp_path / "run").run()
    assert not (tmp_path / "run" / "export").exists()
    monkeypatch.setattr(Trainer, "_export", export)
    rerun = Trainer(_config(), tmp_path / "run").run()
    assert rerun.finished and rerun.step == 20 and (tmp_path / "run" / "export" / "config.json").is_file()


def test_a_rerun_with_fewer_steps_than_the_checkpoint_says_so_and_reports_the_checkpoints_step(tmp_path, caplog):
    assert Trainer(_config(), tmp_path / "run").run().step == 20
    with caplog.at_level("INFO", logger="flaxsst"):
        rerun = Trainer(_config("train.max_steps=8"), tmp_path / "run").run()
    assert rerun.finished and rerun.step == 20 and rerun.train_seconds < 5
    assert "the checkpoint's step 20 is past this run's last step 8 (train.max_steps=8" in caplog.text



def test_a_warmup_as_long_as_the_schedule_is_named(tmp_path, caplog):
    with caplog.at_level("INFO", logger="flaxsst"):
        Trainer(_config("train.warmup_steps=100000", "train.max_steps=2"), tmp_path / "run").run()
    assert "train.warmup_steps=100000 is not shorter than the schedule's 20 steps" in caplog.text


def test_the_load_report_is_logged_once(tmp_path, vocab_file, caplog):
    """A checkpoint without the classification head (distilbert-base-uncased's case): the freshly
    initialised head is reported once, by the trainer, not again by the loader."""
    import transformers

    from flaxsst.run_setup import build_model, build_tokenizer
    from tests.fixtures import tiny_hf_config

    transformers.DistilBertModel(tiny_hf_config(len(vocab_file.read_text().splitlines()))).save_pretrained(tmp_path)
    config = _config(f"model.pretrained={tmp_path}", f"model.tokenizer={vocab_file}")
    with caplog.at_level("INFO"):
        build_model(config, build_tokenizer(config, tmp_path))
    reports = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert len(reports) == 1 and "pre_classifier.weight" in reports[0]


def test_a_resume_names_its_checkpoint_and_does_not_repeat_the_load_report(tmp_path, tiny_model_dir, caplog):
    base = tmp_path / "base"  # DistilBERT without the classifier head: loading it initialises the head
    transformers.DistilBertModel.from_pretrained(tiny_model_dir).save_pretrained(base)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            (base / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = _config(f"model.pretrained={base}", "data.max_seq_length=32")

    def interrupt_at_5(trainer, step):
        if step == 5:
            trainer.request_stop()

    with caplog.at_level("INFO", logger="flaxsst"):
        assert not Trainer(config, tmp_path / "run", on_step=interrupt_at_5).run().finished
    assert "freshly initialised (not in the checkpoint): pre_classifier.weight" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="flaxsst"):
        assert Trainer(config, tmp_path / "run").run().finished
    assert "freshly initialised" not in caplog.text and "loaded distilbert checkpoint" not in caplog.text.lower()
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / '5'} at step 5 of 20" in caplog.text


@pytest.mark.parametrize("overrides, expected", [
    # warmup 30 of a 20-step schedule is refused elsewhere; here warmup 10, the run stops at step 3:
    # the last step (index 2) runs at 3e-3 * 2 / 10
    (["train.warmup_steps=10", "train.max_steps=3"],
     "train.max_steps=3 stops the run inside its 10-step warmup: the learning rate stops at 0.0006, "
     "below its peak train.learning_rate=0.003"),
    # warmup 2 of 20 steps, stop at 6: the last step (index 5) at 3e-3 * (20 - 5) / 18
    (["train.warmup_steps=2", "train.max_steps=6"],
     "train.max_steps=6 stops the run at step 6 of the schedule's 20 (train.num_epochs=2): the learning rate "
     "stops at 0.0025, still 83% of its peak"),
])
def test_max_steps_that_cut_the_schedule_short_are_one_warning_with_the_last_learning_rate(tmp_path, caplog,
                                                                                          overrides, expected):
    with caplog.at_level("WARNING", logger="flaxsst"):
        assert Trainer(_config(*overrides), tmp_path).run().finished
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings


def test_a_full_schedule_gives_no_schedule_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="flaxsst"):
        assert Trainer(_config("train.warmup_steps=2", "train.max_steps=15"), tmp_path).run().finished
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
