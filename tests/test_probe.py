"""The bias probe: its probabilities are the Classifier's, its summary is numpy's on its own CSV, its
picture is a real PNG, and bad templates or fillers are one line before any model is loaded."""

from __future__ import annotations

import csv
import json
import struct

import numpy as np
import pytest

from flaxsst.errors import ConfigError
from flaxsst.probe import DEFAULT_TEMPLATES, countries, load_fillers, load_probe_file, load_templates
from tests.commands import assert_one_line_error, command_env, run

TEMPLATES = ["This film was filmed in {X}.", "{X} is where the film was made ."]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("probe")
    (out / "fillers.tsv").write_text("# a test set\nFrance\tEurope\nItaly\tEurope\nthe film\tother\n\ncharming\tother\n"
                                     "a\tother\nFrance\tEurope\n")
    result = run(["-m", "flaxsst.probe", "--model", str(tiny_model_dir), "--templates", *TEMPLATES,
                  "--fillers", str(out / "fillers.tsv"), "--output", str(out / "result")], command_env())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "result" / "probe.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"out": out / "result", "rows": rows, "stdout": result.stdout,
            "summary": json.loads((out / "result" / "summary.json").read_text())}


def test_probabilities_equal_the_classifier_on_the_filled_sentences(probe_run, tiny_model_dir):
    from flaxsst import Classifier

    rows = probe_run["rows"]
    assert [(r["template"], r["filler"]) for r in rows] == [
        (t, f) for t in TEMPLATES for f in ["France", "Italy", "the film", "charming", "a"]]  # a repeat is dropped
    assert rows[0]["sentence"] == "This film was filmed in France." and rows[0]["group"] == "Europe"
    predictions = Classifier.from_pretrained(tiny_model_dir)([r["sentence"] for r in rows])
    expected = [p["score"] if p["label"] == "POSITIVE" else 1 - p["score"] for p in predictions]
    np.testing.assert_allclose([float(r["p_positive"]) for r in rows], expected, rtol=0, atol=1e-6)
    assert [r["label"] for r in rows] == [p["label"] for p in predictions]


def test_summary_numbers_equal_numpy_on_the_csv(probe_run):
    rows, summary = probe_run["rows"], probe_run["summary"]
    table = np.array([[float(r["p_positive"]) for r in rows if r["template"] == t] for t in TEMPLATES])
    fillers = ["France", "Italy", "the film", "charming", "a"]
    per_filler = table.mean(axis=0)
    stats = summary["p_positive"]
    assert stats["min"] == pytest.approx(per_filler.min()) and stats["max"] == pytest.approx(per_filler.max())
    assert stats["spread"] == pytest.approx(np.ptp(per_filler)) and stats["mean"] == pytest.approx(per_filler.mean())
    assert stats["std"] == pytest.approx(np.std(per_filler))
    assert summary["most_positive"][0] == {"filler": fillers[int(per_filler.argmax())], "p_positive": pytest.approx(per_filler.max())}
    assert summary["most_negative"][0]["filler"] == fillers[int(per_filler.argmin())]
    for k, template in enumerate(summary["per_template"]):
        assert template["template"] == TEMPLATES[k] and template["spread"] == pytest.approx(np.ptp(table[k]))
        assert template["std"] == pytest.approx(np.std(table[k]))
    assert summary["per_group"]["Europe"]["mean"] == pytest.approx(per_filler[:2].mean())
    assert summary["per_group"]["other"]["fillers"] == 3
    assert summary["labelled_positive"] == pytest.approx(np.mean(per_filler > 0.5))
    assert f"spread {stats['spread']:.3f}" in probe_run["stdout"]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_picture_is_a_png_of_the_expected_size(probe_run):
    assert _png_size(probe_run["out"] / "probe.png") == (1200, 800)


def test_countries_are_every_iso_3166_country_named_as_a_sentence_would():
    import pycountry

    names = countries().fillers
    assert len(names) == len(pycountry.countries) == len(set(names))
    assert {"France", "Afghanistan", "South Korea", "The Democratic Republic of the Congo", "British Virgin Islands",
            "Holy See", "Bolivia"} <= set(names)
    assert not [n for n in names if n.endswith((" of", " of the", ")"))]


def test_built_in_sets_name_their_sources_and_groups():
    for name in ("first_names", "religions", "occupations"):
        fillers = load_fillers(name)
        assert fillers.fillers and all(fillers.groups) and len(fillers.source) > 40
        assert DEFAULT_TEMPLATES[name].count("{X}") == 1
    assert len(load_fillers("first_names").fillers) == 100 and len(load_fillers("occupations").fillers) == 40


def test_templates_and_fillers_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"template 'This film was filmed in COUNTRY.' has no \{X\} placeholder"):
        load_templates(["This film was filmed in COUNTRY."])
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="filler set .*empty.txt is empty"):
        load_fillers(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match=r"--fillers nations: neither a filler set \(countries, first_names"):
        load_fillers("nations")
    (tmp_path / "probe.yaml").write_text("templates: ['{X} made it.']\nfillers: {good: [Ann, Bo], bad: [Cy]}\n")
    templates, fillers = load_probe_file(tmp_path / "probe.yaml")
    assert templates == ["{X} made it."] and fillers.fillers == ["Ann", "Bo", "Cy"] and fillers.groups == ["good", "good", "bad"]


@pytest.mark.parametrize("args,named", [
    (["--templates", "no placeholder here"], ["template 'no placeholder here' has no {X} placeholder"]),
    (["--fillers", "nations"], ["--fillers nations: neither a filler set"]),
    (["--fillers", "EMPTY"], ["empty.txt is empty"]),
    (["--probe", "BAD_YAML"], ["bad.yaml:2:", "invalid YAML"]),
])
def test_bad_probe_input_is_one_line_before_any_model_is_loaded(tmp_path, args, named):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.yaml").write_text("fillers: [a, b\ntemplates: x: y\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "bad.yaml") if a == "BAD_YAML" else a
            for a in args]
    # The model does not exist: an error about it would mean the model was loaded first.
    result = run(["-m", "flaxsst.probe", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"), *args],
                 command_env())
    assert_one_line_error(result, *named)


def test_training_curves_read_at_a_glance():
    """Loss on a log axis, the learning rate from step 0 (the warmup shows), the best checkpoint
    (the first step with the highest dev accuracy) marked on every axis."""
    from flaxsst.plot import draw_curves

    records = {
        "run": {0: {"total_steps": 300, "end_step": 300, "steps_per_epoch": 100, "warmup_steps": 60, "learning_rate": 1e-3}},
        "train": {s: {"loss": 1.0 / s, "accuracy": 0.9, "learning_rate": min(s / 60, (300 - s) / 240) * 1e-3}
                  for s in range(20, 301, 20)},
        "eval": {100: {"loss": 0.4, "accuracy": 0.85}, 200: {"loss": 0.3, "accuracy": 0.9}, 300: {"loss": 0.3, "accuracy": 0.9}},
    }
    loss, accuracy, lr = draw_curves(records, "run").axes[:3]
    assert loss.get_yscale() == "log" and loss.get_xlim()[0] == 0
    applied = [line for line in lr.get_lines() if line.get_label() == "applied"][0]
    assert applied.get_xdata()[0] == 0 and applied.get_ydata()[0] == 0.0
    planned = [line for line in lr.get_lines() if line.get_label() == "planned"][0]
    assert list(planned.get_xdata()) == [0, 60, 300] and list(planned.get_ydata()) == [0.0, 1e-3, 0.0]
    for ax in (loss, accuracy, lr):
        (best,) = [line for line in ax.get_lines() if line.get_label().startswith("best checkpoint")]
        assert list(best.get_xdata()) == [200, 200]
        assert ax.get_legend() is not None


def test_the_histogram_of_a_small_spread_shows_its_shape_not_two_bars():
    from flaxsst.probe import histogram_bins

    values = np.linspace(0.97, 0.99, 249)  # as a well-trained model's fillers: all near 0.98
    counts, _ = np.histogram(values, bins=histogram_bins(values))
    assert (counts > 0).sum() >= 15  # over [0, 1] in 20 bins of 0.05 they fill one or two
    wide = np.array([0.1, 0.5, 0.9])
    assert np.array_equal(histogram_bins(wide), np.linspace(0, 1, 21))
