"""The candidates of bench/ do the trainer's math (so bench figures compare like with like)."""

import functools
import json

import jax
import numpy as np
import pytest

from bench import step_variants
from flaxsst.config import TrainSection
from flaxsst.convert import config_from_hf
from flaxsst.model import Precision, init_params
from flaxsst.parallel import put_batch, replicate, unreplicate
from tests.fixtures import random_ids, tiny_hf_config


def _batches(n, rows=8, seq=16, vocab=120):
    out = []
    for i in range(n):
        ids, mask = random_ids(np.random.default_rng(i), rows, seq, vocab)
        out.append({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                    "labels": np.random.default_rng(100 + i).integers(0, 2, rows).astype(np.int32),
                    "weights": (np.arange(rows) < rows - i).astype(np.float32)})  # ragged rows too
    return out


@functools.cache
def _run(variant, dtype="float32", n_batches=4, dropout=0.1):
    devices = jax.devices()[:2]
    batches = _batches(n_batches)
    config, _ = config_from_hf(tiny_hf_config(120, n_layers=3, dropout=dropout, attention_dropout=dropout,
                                              seq_classif_dropout=dropout).to_dict())
    params = init_params(config, 0)
    train = TrainSection(learning_rate=1e-3, warmup_steps=1)
    step, state, k, layout = step_variants.build(variant, config, Precision(dtype), params, train, 10)
    mapped = step_variants.pmapped(step, devices)
    state = replicate(state, devices)
    grad_norms = []
    for start in range(0, len(batches), k):
        group = [put_batch(b, devices) for b in batches[start:start + k]]
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1), *group) if k > 1 else group[0]
        state, metrics = mapped(state, stacked)
        grad_norms += list(np.ravel(unreplicate(metrics)["grad_norm"]))
    return layout.unpack(unreplicate(state).params), grad_norms


@pytest.mark.parametrize("variant", ["tree", "flat", "stacked", "scan4"])
def test_candidate_steps_equal_the_trainers_step_dropout_included(variant):
    """Four steps with dropout: the layouts hold the same parameters, and the scanned blocks draw the
    dropout masks the unrolled ones draw."""
    expected, expected_norms = _run("grouped")
    got, norms = _run(variant)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-4)
    start = init_params(config_from_hf(tiny_hf_config(120, n_layers=3).to_dict())[0], 0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(start)))
    assert moved > 1e-3  # four steps at lr 1e-3 really moved the weights


@pytest.mark.parametrize("deterministic", [True, False])
def test_scanned_blocks_give_the_unrolled_blocks_hidden_states(deterministic):
    """``bench.layouts.ScannedLayers`` (blocks 0..n-2 as one ``nn.scan``) on the stacked parameters gives
    every position's hidden state the unrolled ``TransformerLayers`` gives, dropout masks included."""
    from bench.layouts import ScannedLayers, stack_layers
    from flaxsst.model import TransformerLayers

    config, _ = config_from_hf(tiny_hf_config(120, n_layers=4, dropout=0.3, attention_dropout=0.3).to_dict())
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 16, config.dim)).astype(np.float32)
    _, mask = random_ids(rng, 3, 16, 120)
    unrolled = TransformerLayers(config)
    params = unrolled.init(jax.random.PRNGKey(1), hidden, mask, True)["params"]
    rngs = {"dropout": jax.random.PRNGKey(2)}
    expected = unrolled.apply({"params": params}, hidden, mask, deterministic, rngs=rngs)
    stacked = stack_layers({"transformer": {"layer": params}}, config.n_layers)["transformer"]["layer"]
    got = ScannedLayers(config).apply({"params": stacked}, hidden, mask, deterministic, rngs=rngs)
    # the same sums, compiled as a loop or unrolled: a few float32 ulps apart where XLA fuses them differently
    # (AVX-512 machines: 1.2e-6 on a value of 2.5)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
    if not deterministic:  # the masks really dropped something
        assert np.abs(expected - unrolled.apply({"params": params}, hidden, mask, True)).max() > 1e-2


def test_allrows_variant_trains_as_the_cls_only_classifier():
    """The before/after of the [CLS]-only last block: with dropout off (the other positions' rows
    of the last block draw dropout bits too), four steps with the last block over every position
    end where the [CLS]-only classifier does."""
    config = config_from_hf(tiny_hf_config(120).to_dict())[0]
    assert not isinstance(step_variants.model_for("grouped", config), step_variants.AllRowsClassifier)
    assert isinstance(step_variants.model_for("allrows", config), step_variants.AllRowsClassifier)
    expected, expected_norms = _run("grouped", dropout=0.0)
    got, norms = _run("allrows", dropout=0.0)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-4)


def test_variant_names_are_parsed_and_bad_ones_named():
    assert step_variants.parse("grouped") == ("grouped", 1)
    assert step_variants.parse("allrows") == ("grouped", 1)
    assert step_variants.parse("einsum") == ("grouped", 1)
    assert step_variants.parse("flat") == ("flat", 1)
    assert step_variants.parse("scan4") == ("grouped", 4)
    assert step_variants.parse("stacked_scan8") == ("stacked", 8)
    with pytest.raises(ValueError, match="variant 'fused'"):
        step_variants.parse("fused")


def test_packed_classifier_equals_the_classifier(tiny_model_dir):
    from bench import classifier_variants
    from flaxsst.classifier import Classifier

    texts = ["a good film", "", "bad " * 300, "so-so, really", "x"]
    base = Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=64)
    packed = classifier_variants.PackedClassifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=64)
    expected, got = base(texts), packed(texts)
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], rtol=1e-6)
    assert packed([]) == []


def test_trace_summary_counts_kernels_busy_time_and_span_per_step(tmp_path):
    import gzip
    import json

    from bench import throughput

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        # two steps on the stream: kernels at [0,10), [5,15) (overlap), [40,50); [100,110), [200,230)
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 0, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 5, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 40, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 100, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 200, "dur": 30},
        {"ph": "X", "pid": 2, "tid": 3, "name": "PmapFunction(train_step)", "ts": 0, "dur": 500},
        {"ph": "X", "pid": 2, "tid": 3, "name": "PmapFunction(train_step)", "ts": 600, "dur": 300},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = throughput.summarize_trace(str(path), dispatches=2)
    stream = summary["/device:GPU:0 | Stream #7(Compute)"]
    assert stream["events_per_step"] == 2.5
    assert stream["busy_ms_per_step"] == (15 + 10 + 10 + 30) / 1e3 / 2  # the overlap counted once
    assert stream["span_ms_per_step"] == 230 / 1e3 / 2
    assert stream["top_us_per_step"] == {"fusion": 20.0, "gemm": 15.0}
    assert summary["host_dispatch_ms"] == 0.4


def test_same_math_compares_two_runs_losses_step_by_step(tmp_path):
    from bench.same_math import compare_losses
    from flaxsst.errors import DataError

    def write(name, losses):
        rows = [{"kind": "train", "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
        rows.insert(1, {"kind": "eval", "step": 1, "loss": 9.0})  # eval rows are not train losses
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("\n".join(map(json.dumps, rows)) + "\n")
        return tmp_path / name

    before = write("a.jsonl", [0.7, 0.6, 0.5, 0.4])
    after = write("run/metrics.jsonl", [0.7, 0.6 + 2e-6, 0.5 - 3e-5, 0.4])
    got = compare_losses(before, after, 1e-5)
    assert (got["steps"], got["bitwise"], got["first_differing"], got["beyond_tolerance"], got["max_at"]) == (4, 2, 2, [3], 3)
    assert got["max_diff"] == pytest.approx(3e-5)
    with open(after, "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a run killed while writing
    assert compare_losses(before, tmp_path / "run", 1e-5)["steps"] == 4  # a run's folder stands for its metrics.jsonl
    (tmp_path / "config.yaml").write_text("model:\n  dim: 32\n")
    with pytest.raises(DataError, match="config.yaml: line 1 is not a JSON record"):
        compare_losses(before, tmp_path / "config.yaml", 1e-5)
    (tmp_path / "evals.jsonl").write_text('{"kind": "eval", "step": 1, "loss": 0.5}\n')
    with pytest.raises(DataError, match="evals.jsonl: no train records"):
        compare_losses(tmp_path / "evals.jsonl", before, 1e-5)
