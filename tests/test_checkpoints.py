"""Checkpoints, manifests, the workdir lock and the run's bookkeeping, one piece at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxsst.checkpoints import (
    Checkpoints,
    WorkdirLock,
    check_manifest,
    check_resumable,
    config_differences,
    rewind_metrics,
    write_config,
    write_manifest,
)
from flaxsst.config import load_train_config
from flaxsst.errors import CheckpointError, ConfigError, WorkdirError

CONF = Path(__file__).resolve().parents[1] / "conf"


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"step": np.asarray(step, np.int32), "params": {"w": rng.normal(size=(64, 8)).astype(np.float32)}}


def test_manifest_names_a_truncated_a_missing_an_overwritten_and_an_extra_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(4096))
    (tmp_path / "d" / "b.json").write_text('{"x": 1}')
    write_manifest(tmp_path)
    assert check_manifest(tmp_path) is None
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "a.bin").write_bytes(data[:100])
    assert check_manifest(tmp_path) == "a.bin has 100 bytes, the manifest says 4096"
    (tmp_path / "a.bin").write_bytes(data[:2000] + bytes(16) + data[2016:])
    assert check_manifest(tmp_path) == "a.bin does not match its checksum"
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "d" / "b.json").unlink()
    assert check_manifest(tmp_path) == "d/b.json is missing"
    (tmp_path / "d" / "b.json").write_text('{"x": 1}')
    (tmp_path / "c.txt").write_text("")
    assert check_manifest(tmp_path) == "c.txt is not in the manifest"
    (tmp_path / "c.txt").unlink()
    (tmp_path / "MANIFEST.sha256").unlink()
    assert check_manifest(tmp_path) == "MANIFEST.sha256 is missing"


def test_saved_state_restores_equal_and_pruning_keeps_the_newest_and_the_protected(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (3, 6, 9, 12):
        checkpoints.save(step, _state(step), {"step": step}, protect=[6])
    assert checkpoints.committed_steps() == [6, 9, 12]
    restored, meta = checkpoints.restore(9, _state(0))
    assert meta == {"step": 9}
    np.testing.assert_array_equal(restored["params"]["w"], _state(9)["params"]["w"])
    assert int(restored["step"]) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12", "6", "9"]


def test_the_newest_intact_checkpoint_is_chosen_and_all_damaged_is_an_error_listing_them(tmp_path, caplog):
    checkpoints = Checkpoints(tmp_path, keep=3)
    for step in (1, 2, 3):
        checkpoints.save(step, _state(step), {"step": step})
    assert checkpoints.latest_intact() == 3
    meta = tmp_path / "3" / "meta.json"
    meta.write_text(meta.read_text().replace("3", "4"))  # the same size, other bytes
    with caplog.at_level("WARNING", logger="flaxsst"):
        assert checkpoints.latest_intact() == 2
    assert f"{tmp_path / '3'}: meta.json does not match its checksum" in caplog.text
    for step in (1, 2):
        (tmp_path / str(step) / "meta.json").unlink()
    with pytest.raises(CheckpointError) as error:
        checkpoints.latest_intact()
    assert str(error.value).startswith(f"every checkpoint in {tmp_path} is damaged: {tmp_path / '3'}: meta.json")
    assert f"{tmp_path / '1'}: meta.json is missing" in str(error.value)


def test_a_half_written_save_is_never_read_and_is_cleaned_up(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(5, _state(5), {"step": 5})
    (tmp_path / ".partial-8" / "state").mkdir(parents=True)
    (tmp_path / ".deleting-2").mkdir()
    assert checkpoints.committed_steps() == [5] and checkpoints.latest_intact() == 5
    checkpoints.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]


def test_saving_a_step_again_replaces_it(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(5, _state(5), {"step": 5, "run": 1})
    checkpoints.save(5, _state(5), {"step": 5, "run": 2})
    assert checkpoints.read_meta(5)["run"] == 2 and checkpoints.verify(5) is None


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(5, _state(5), {"step": 5})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(WorkdirError, match=rf"cannot write checkpoint 8 to {tmp_path}: no space left on the device "
                                           rf".*then rerun the same command \(it resumes from {tmp_path / '5'}\)"):
        checkpoints.save(8, _state(8), {"step": 8})
    assert checkpoints.committed_steps() == [5] and not list(tmp_path.glob(".partial-*"))


def test_metrics_rewind_keeps_each_record_once_in_step_order_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": 2, "loss": 1.0}, {"kind": "train", "step": 4, "loss": 0.9},
             {"kind": "train", "step": 6, "loss": 0.8}, {"kind": "train", "step": 4, "loss": 0.7},
             {"kind": "eval", "step": 4, "accuracy": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')
    rewind_metrics(path, 4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("eval", 4)]
    assert records[1]["loss"] == 0.7  # the record written last (by the resumed run) is kept
    rewind_metrics(path, 0)
    assert path.read_text() == ""


def test_a_rerun_may_change_how_often_it_logs_but_not_what_it_computes(tmp_path):
    saved = load_train_config(CONF / "tiny.yaml")
    free = load_train_config(CONF / "tiny.yaml", ["train.log_every_steps=7", "train.eval_every_steps=30",
                                                  "train.checkpoint_every_steps=9", "train.keep_checkpoints=5",
                                                  "train.max_steps=40", "data.cache_dir=/tmp/x"])
    assert config_differences(saved, free) == []
    changed = load_train_config(CONF / "tiny.yaml", ["train.global_batch_size=16", "train.learning_rate=1e-3",
                                                     "train.seed=3", "model.config.dim=64", "data.path=/data/sst2"])
    assert config_differences(saved, changed) == [
        "model.config.dim: 32 -> 64", "data.path: 'synthetic' -> '/data/sst2'", "train.learning_rate: 0.003 -> 0.001",
        "train.global_batch_size: 32 -> 16", "train.seed: 0 -> 3"]
    write_config(tmp_path, saved)
    check_resumable(tmp_path, free)
    with pytest.raises(ConfigError, match=r"holds a run started with another config \(model.config.dim: 32 -> 64; .*use a new --workdir"):
        check_resumable(tmp_path, changed)


_HOLD = ("import sys, time; from pathlib import Path; from flaxsst.checkpoints import WorkdirLock; "
         "WorkdirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")


def test_the_lock_names_its_holder_and_is_free_again_once_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=rf"workdir {tmp_path} is in use by pid {holder.pid} on .*-c"):
        WorkdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
