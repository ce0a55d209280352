"""``python -m flaxsst.bulk`` as a user runs it: one-line errors before Ray starts, a job on a Ray instance of its
own, and a job on a real two-node Ray cluster (``ray start`` processes on loopback addresses) whose worker node
is killed with SIGKILL mid-job. Answers are checked against ``Classifier``."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="the ray extra (pip install -e '.[ray]') brings pyarrow")
pytest.importorskip("ray", reason="the ray extra (pip install -e '.[ray]') is not installed")
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import psutil  # noqa: E402

from flaxsst import bulk  # noqa: E402
from tests.serving import free_port, served_classifier, texts_of  # noqa: E402

MAX_LENGTH = 16


def run_bulk(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flaxsst.bulk", "--max-length", str(MAX_LENGTH), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_output(folder, output_format="parquet"):
    return pads.dataset(folder, format="parquet" if output_format == "parquet" else "json").to_table()


def expected_labels(model_dir, texts):
    logits = served_classifier(model_dir, MAX_LENGTH).logits(texts)
    return [["NEGATIVE", "POSITIVE"][i] for i in np.argmax(logits, axis=1)]


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/nothing-*.parquet"], "--input {tmp}/nothing-*.parquet: no file matches"),
    (["--input", "{tmp}/a.parquet", "{tmp}/b.csv"], "--input: files of different kinds (csv, parquet)"),
    (["--input", "{tmp}/c.xlsx"], "--input {tmp}/c.xlsx: not a file this command reads"),
    (["--input", "{tmp}/d.txt", "--text-column", "review"], "--text-column review: text files have one column"),
    (["--input", "{tmp}/a.parquet", "--output", "{tmp}/full"], "--output {tmp}/full: the folder is not empty"),
    (["--input", "{tmp}/a.parquet", "--model", "{tmp}/no-model"], "--model"),
    (["--input", "{tmp}/a.parquet", "--actors", "0"], "--actors 0: must be positive"),
    (["--input", "{tmp}/a.parquet", "--address", "127.0.0.1:{port}"], "--address 127.0.0.1:{port}: no Ray cluster answers"),
])
def test_a_bad_argument_is_one_line_naming_it_before_ray_starts(tmp_path, tiny_model_dir, capsys, args, message):
    for name in ("a.parquet", "b.csv", "c.xlsx", "d.txt", "full/x"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    argv = ["--model", str(tiny_model_dir), "--output", str(tmp_path / "out"), *args]
    port = str(free_port())  # nothing listens there
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{port}", port) for a in argv]
    assert bulk.console_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message.replace("{tmp}", str(tmp_path)).replace("{port}", port) in err
    assert not (tmp_path / "out").exists()


def test_overwrite_keeps_the_old_output_when_an_argument_is_bad(tmp_path, capsys):
    (tmp_path / "a.parquet").write_text("x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "part.parquet").write_text("earlier results")
    argv = ["--input", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "old"), "--overwrite"]
    assert bulk.console_main(["--model", str(tmp_path / "no-model"), *argv]) == 2
    assert bulk.console_main(["--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "old"),
                              "--output", str(tmp_path / "old"), "--overwrite"]) == 2
    assert "holds the input file" in capsys.readouterr().err
    assert (tmp_path / "old" / "part.parquet").read_text() == "earlier results"


def test_json_lines_mixing_types_are_written_as_text_with_error_values(tmp_path, tiny_model_dir):
    rows = ['{"id": 1, "text": "the film was great"}', '{"id": "b2", "text": 7}', '{"id": 3, "text": null}',
            '{"id": 4, "text": ["a", "list"]}', '{"id": 5}', '{"id": 6, "text": "a boring story"}']
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(row + "\n" for row in rows))
    done = run_bulk(["--model", str(tiny_model_dir), "--input", str(source), "--output", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(tmp_path / "out")  # one schema: Arrow's own types, no pickles
    assert table.schema.field("id").type == pa.string() and table.schema.field("text").type == pa.string()
    got = {row["id"]: row for row in table.to_pylist()}
    assert [got[i]["error"] for i in ("1", "b2", "3", "4", "5", "6")] == [
        None, "text is int, expected str", "text is missing", "text is list, expected str", "text is missing", None]
    assert got["b2"]["text"] == "7" and got["5"]["text"] is None
    assert [got["1"]["label"], got["6"]["label"]] == expected_labels(tiny_model_dir, ["the film was great",
                                                                                      "a boring story"])


def test_a_tsv_of_sentences_is_scored_into_json_lines_on_a_local_ray(tmp_path, tiny_model_dir):
    texts = texts_of(3, 300)
    texts[5] = 'a "quoted" film , 2 stars'  # GLUE's TSVs are not quoted
    texts[9] = "1984"  # a text column of numbers stays text
    texts[12] = ""
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)), encoding="utf-8")
    out = tmp_path / "scored"
    done = run_bulk(["--model", str(tiny_model_dir), "--input", str(tsv), "--output", str(out), "--format", "jsonl",
                     "--text-column", "sentence", "--label-column", "predicted", "--batch-rows", "64"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / bulk.SUCCESS).read_text())
    assert summary["rows"] == 300 and summary["errors"] == 1 and summary["format"] == "jsonl"
    assert "bulk: 300 rows, 1 errors" in done.stderr.splitlines()[-1]
    rows = [json.loads(line) for path in out.glob("*.json") for line in path.read_text().splitlines()]
    assert sorted(row["sentence"] for row in rows) == sorted(texts)
    by_text = {row["sentence"]: row for row in rows}
    good = [t for t in texts if t]
    assert [by_text[t]["predicted"] for t in good] == expected_labels(tiny_model_dir, good)
    assert by_text[""]["error"] == "text is empty" and by_text[""]["predicted"] is None
    assert all(by_text[t]["label"] == i % 2 for i, t in enumerate(texts))  # the input's own columns travel along


def test_text_files_keep_their_line_order_with_preserve_order(tmp_path, tiny_model_dir):
    texts = texts_of(4, 200)
    for part in range(2):
        (tmp_path / f"part{part}.txt").write_text("".join(f"{t}\n" for t in texts[part * 100:(part + 1) * 100]))
    out = tmp_path / "scored"
    done = run_bulk(["--model", str(tiny_model_dir), "--input", str(tmp_path / "part*.txt"), "--output", str(out),
                     "--preserve-order", "--batch-rows", "32"])
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(out)
    assert table.column("text").to_pylist() == texts
    assert table.column("label").to_pylist() == expected_labels(tiny_model_dir, texts)


class RayNode:
    """``ray start --block`` in its own session, on a loopback address, stopped with its children by pid."""

    def __init__(self, args, log: Path, env):
        self.log = log
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                                         "--num-cpus", "2", "--disable-usage-stats", *args], env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout=90):
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def processes(self):
        """The ``ray start`` process and every process under it (raylet, its workers and actors)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def actors(self, name: str) -> int:
        """How many of its processes run actor ``name``."""
        count = 0
        for process in self.processes():
            try:
                count += any(name in part for part in process.cmdline())
            except psutil.Error:  # ended meanwhile
                pass
        return count

    def kill(self):
        processes = self.processes()
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        self.process.wait(timeout=30)


@pytest.fixture
def ray_env():
    """Ray's files in a folder of the test's own (short: Ray's socket paths must fit in 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": folder, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    yield env
    shutil.rmtree(folder, ignore_errors=True)


def test_a_job_on_two_nodes_survives_its_worker_node_killed_mid_job(tmp_path, tiny_model_dir, ray_env):
    count = 6000
    texts = texts_of(5, count)
    bad = {17: None, 400: "", 2500: "  "}
    data = tmp_path / "in"
    data.mkdir()
    for part in range(4):
        rows = range(part * count // 4, (part + 1) * count // 4)
        pq.write_table(pa.table({"id": list(rows), "text": [bad.get(i, texts[i]) for i in rows]}),
                       data / f"part{part}.parquet")
    port = free_port()
    ray_env = {**ray_env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), ray_env.get("PYTHONPATH", "")])}
    head = RayNode(["--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--include-dashboard", "false"],
                   tmp_path / "head.log", ray_env)
    worker = None
    try:
        head.wait_started()
        worker = RayNode(["--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3"],
                         tmp_path / "worker.log", ray_env)
        worker.wait_started()
        out = tmp_path / "scored"
        # relative paths, from a folder the nodes do not run in: every node is given absolute ones
        job = subprocess.Popen([sys.executable, "-m", "flaxsst.bulk", "--model", os.path.relpath(tiny_model_dir, tmp_path),
                                "--input", "in", "--output", "scored", "--address", f"127.0.0.2:{port}", "--batch-rows",
                                "50", "--max-length", str(MAX_LENGTH)], env=ray_env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=(tmp_path / "job.log").open("w"), text=True)
        # both nodes hold an actor, and the job has written part of its output: then the worker node dies
        deadline = time.monotonic() + 240
        while not (worker.actors("MapWorker") and len(list(out.glob("*.parquet"))) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.05)
        written_before = len(list(out.glob("*.parquet")))
        worker.kill()
        # the dead node's actor never restarts beside the live one, where it would take the CPU the writes need
        deadline, on_head = time.monotonic() + 300, 0
        while job.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            on_head = max(on_head, head.actors("MapWorker"))
            time.sleep(0.05)
        assert job.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
        assert on_head == 1
    finally:
        if job.poll() is None:
            job.kill()
        for node in (worker, head):
            if node is not None:
                node.kill()
    assert written_before < count // 50 / 2  # the kill came before half the output was written
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(count))  # every row once
    rows = dict(zip(ids, zip(table.column("text").to_pylist(), table.column("label").to_pylist(),
                             table.column("error").to_pylist())))
    good = [i for i in range(count) if i not in bad]
    assert [rows[i][1] for i in good] == expected_labels(tiny_model_dir, [texts[i] for i in good])
    assert [rows[i][2] for i in sorted(bad)] == ["text is missing", "text is empty", "text is empty"]
    assert all(rows[i][2] is None for i in good)
    log = (tmp_path / "job.log").read_text()
    assert f"bulk: {count} rows, 3 errors" in log and "on 2 node(s)" in log


def test_sigterm_mid_job_stops_it_and_its_ray_instance_leaving_no_success_mark(tmp_path, tiny_model_dir, ray_env):
    texts = texts_of(6, 6000)
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    out = tmp_path / "scored"
    job = subprocess.Popen([sys.executable, "-m", "flaxsst.bulk", "--model", str(tiny_model_dir), "--input",
                            str(tmp_path / "in.parquet"), "--output", str(out), "--batch-rows", "20",
                            "--max-length", str(MAX_LENGTH)], env=ray_env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.parquet"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.05)
        ray_processes = psutil.Process(job.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted: {out} holds part of the rows and no _SUCCESS; rerun the "
                                            "same command with --overwrite")
    assert not (out / bulk.SUCCESS).exists() and len(list(out.glob("*.parquet"))) < 6000 // 20
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
