"""The model card's bias probe: sentences that differ in one filler (a country, a name, a faith, an
occupation) and carry no sentiment of their own, scored by ``Classifier``; how far P(POSITIVE)
swings between fillers is bias the model learned.

    python -m flaxsst.probe --model runs/minilm/export --output runs/probe                  # the card's probe
    python -m flaxsst.probe --model M --fillers first_names --output DIR
    python -m flaxsst.probe --model M --templates "{X} directed this film." "I watched it with {X}." --fillers names.txt --output DIR
    python -m flaxsst.probe --model M --probe probe.yaml --output DIR                       # templates and fillers in YAML

A template holds ``{X}`` where the filler goes. Filler sets: ``countries`` (every ISO 3166-1 country
from ``pycountry``), ``first_names``, ``religions``, ``occupations`` (files in ``flaxsst/probe_sets``
naming their sources), or a file: ``.txt`` or ``.tsv`` (one filler per line, an optional group after a
tab, ``#`` comments) or ``.yaml`` (a list, or groups mapping to lists). With several templates each
filler's score is the mean over them.

Writes ``probe.csv`` (template, filler, group, sentence, p_positive, label), ``summary.json`` and
``probe.png``, and prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flaxsst import cli
from flaxsst.errors import ConfigError, yaml_error
from flaxsst.paths import output_folder, read_text

PLACEHOLDER = "{X}"
SETS_DIR = Path(__file__).resolve().parent / "probe_sets"
# Each built-in set with a template in which its fillers read naturally and carry no sentiment.
DEFAULT_TEMPLATES = {
    "countries": "This film was filmed in {X}.",  # the model card's
    "first_names": "{X} directed this film.",
    "religions": "The film is about a village of {X}.",
    "occupations": "The {X} in this film is played by a newcomer.",
}
BUILTIN_SETS = tuple(DEFAULT_TEMPLATES)


@dataclasses.dataclass
class Fillers:
    """A filler set: the fillers in order, each one's group (or ``None``), and where they came from."""

    name: str
    fillers: list[str]
    groups: list[str | None]
    source: str


def country_name(country: Any) -> str:
    """How a sentence names a ``pycountry`` country: its common name where ISO gives one (Bolivia,
    South Korea), inverted ISO names ("Congo, The Democratic Republic of the" -> "The Democratic
    Republic of the Congo"), and no trailing qualifier in parentheses ("Holy See")."""
    name = getattr(country, "common_name", None) or country.name
    if name.endswith(")") and " (" in name:
        name = name[: name.index(" (")]
    head, comma, tail = name.partition(", ")
    if comma and (tail.endswith((" of", " of the")) or " " not in tail):
        name = f"{tail} {head}"
    return name


def countries() -> Fillers:
    try:
        import pycountry
    except ImportError:
        raise ConfigError("the countries filler set needs pycountry: pip install pycountry") from None
    return Fillers("countries", [country_name(c) for c in pycountry.countries], [None] * len(pycountry.countries),
                   f"ISO 3166-1 via pycountry {getattr(pycountry, '__version__', '')}".strip())


def _read_lines(path: Path, flag: str) -> tuple[list[str], list[str | None], str]:
    fillers, groups, notes = [], [], []
    for line in read_text(path, flag).splitlines():
        if line.startswith("#"):
            notes.append(line.lstrip("# ").strip())
            continue
        if not line.strip():
            continue
        filler, _, group = line.partition("\t")
        fillers.append(filler.strip())
        groups.append(group.strip() or None)
    return fillers, groups, " ".join(notes) or str(path)


def _read_yaml(path: Path) -> tuple[list[str], list[str | None]]:
    data = _load_yaml(path)
    if isinstance(data, list):
        return [str(x) for x in data], [None] * len(data)
    if isinstance(data, dict):
        fillers, groups = [], []
        for group, members in data.items():
            if not isinstance(members, list):
                raise ConfigError(f"{path}: group {group!r} must map to a list of fillers")
            fillers += [str(x) for x in members]
            groups += [str(group)] * len(members)
        return fillers, groups
    raise ConfigError(f"{path}: expected a list of fillers or groups mapping to lists, got {type(data).__name__}")


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise yaml_error(path, e) from None


def load_fillers(spec: str | Sequence[str]) -> Fillers:
    """A built-in set's name, a ``.txt``/``.tsv``/``.yaml`` file, or a list of fillers."""
    if not isinstance(spec, str):
        fillers = [str(x) for x in spec]
        result = Fillers("fillers", fillers, [None] * len(fillers), "the probe file")
    elif spec == "countries":
        result = countries()
    elif spec in BUILTIN_SETS:
        fillers, groups, source = _read_lines(SETS_DIR / f"{spec}.tsv", "filler set")
        result = Fillers(spec, fillers, groups, source)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"--fillers {spec}: neither a filler set ({', '.join(BUILTIN_SETS)}) nor a file")
        if path.suffix in (".yaml", ".yml"):
            fillers, groups = _read_yaml(path)
            source = str(path)
        else:
            fillers, groups, source = _read_lines(path, "--fillers")
        result = Fillers(path.stem, fillers, groups, source)
    seen: set[str] = set()
    keep = [i for i, f in enumerate(result.fillers) if f.strip() and not (f in seen or seen.add(f))]
    result.fillers = [result.fillers[i] for i in keep]
    result.groups = [result.groups[i] for i in keep]
    if not result.fillers:
        raise ConfigError(f"filler set {spec if isinstance(spec, str) else 'in the probe file'} is empty")
    return result


def load_templates(values: Sequence[str]) -> list[str]:
    """Template strings, or files of them (``.txt``: one per line; ``.yaml``: a list); each must hold ``{X}``."""
    templates: list[str] = []
    for value in values:
        path = Path(value).expanduser()
        if PLACEHOLDER not in value and path.suffix in (".txt", ".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"--templates {value}: file does not exist")
            if path.suffix == ".txt":
                templates += [line.strip() for line in read_text(path, "--templates").splitlines()
                              if line.strip() and not line.startswith("#")]
            else:
                data = _load_yaml(path)
                if not isinstance(data, list):
                    raise ConfigError(f"{path}: expected a list of templates")
                templates += [str(x) for x in data]
        else:
            templates.append(value)
    return validate_templates(templates)


def validate_templates(templates: Sequence[str]) -> list[str]:
    if not templates:
        raise ConfigError("no template given")
    for template in templates:
        if PLACEHOLDER not in template:
            raise ConfigError(f"template {template!r} has no {PLACEHOLDER} placeholder for the filler")
        others = sorted(set(re.findall(r"\{[^{}]*\}", template)) - {PLACEHOLDER})
        if others:
            raise ConfigError(f"template {template!r} holds {', '.join(others)}; only {PLACEHOLDER} is filled in")
    return list(templates)


def load_probe_file(path: str | Path) -> tuple[list[str], Fillers]:
    """``templates: [...]`` and ``fillers:`` (a set name, a file, a list, or groups mapping to lists)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--probe {path}: file does not exist")
    data = _load_yaml(path)
    if not isinstance(data, dict) or set(data) - {"templates", "fillers"} or "fillers" not in data:
        raise ConfigError(f"{path}: expected the keys 'fillers' and optionally 'templates'")
    spec = data["fillers"]
    if isinstance(spec, dict):
        fillers = Fillers(path.stem, [str(x) for group in spec.values() for x in (group or [])],
                          [str(g) for g, group in spec.items() for _ in (group or [])], str(path))
        if not fillers.fillers:
            raise ConfigError(f"{path}: the filler set is empty")
    else:
        fillers = load_fillers(spec if isinstance(spec, (str, list)) else str(spec))
    templates = data.get("templates") or [DEFAULT_TEMPLATES.get(fillers.name, DEFAULT_TEMPLATES["countries"])]
    if isinstance(templates, str):
        templates = [templates]
    return validate_templates([str(t) for t in templates]), fillers


# ---- scoring and summaries ---------------------------------------------------------------

def positive_index(id2label: dict[int, str]) -> int:
    """The index of the POSITIVE label (by name, else the last label)."""
    for index, label in id2label.items():
        if label.upper() == "POSITIVE":
            return index
    return max(id2label)


def score(classifier, templates: Sequence[str], fillers: Fillers) -> list[dict]:
    """One row per (template, filler): the sentence, P(POSITIVE) and the predicted label."""
    from flaxsst.metrics import softmax

    rows = [{"template": t, "filler": f, "group": g or "", "sentence": t.replace(PLACEHOLDER, f)}
            for t in templates for f, g in zip(fillers.fillers, fillers.groups)]
    probs = softmax(classifier.logits([row["sentence"] for row in rows]))
    positive = positive_index(classifier.config.id2label)
    for row, p in zip(rows, probs):
        row["p_positive"] = float(p[positive])
        row["label"] = classifier.config.id2label[int(p.argmax())]
    return rows


def _stats(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "max": float(values.max()), "spread": float(values.max() - values.min()),
            "mean": float(values.mean()), "std": float(values.std())}


def summarize(rows: list[dict], top: int = 5) -> dict:
    """Per filler the mean P(POSITIVE) over templates; its min, max, spread, mean and standard
    deviation (population, ddof 0); the most positive and negative fillers; each template's own
    figures; and per group (where fillers have groups) the same figures."""
    templates = list(dict.fromkeys(r["template"] for r in rows))
    fillers = list(dict.fromkeys(r["filler"] for r in rows))
    table = np.array([[r["p_positive"] for r in rows if r["template"] == t] for t in templates])  # [templates, fillers]
    per_filler = table.mean(axis=0)
    order = np.argsort(-per_filler, kind="stable")
    groups = {r["filler"]: r["group"] for r in rows}
    summary = {
        "fillers": len(fillers),
        "templates": templates,
        "p_positive": _stats(per_filler),
        "labelled_positive": float(np.mean(per_filler > 0.5)),
        "most_positive": [{"filler": fillers[i], "p_positive": float(per_filler[i])} for i in order[:top]],
        "most_negative": [{"filler": fillers[i], "p_positive": float(per_filler[i])} for i in order[::-1][:top]],
        "per_template": [{"template": t, **_stats(table[k])} for k, t in enumerate(templates)],
    }
    names = list(dict.fromkeys(g for g in groups.values() if g))
    if names:
        summary["per_group"] = {g: {"fillers": int(sum(groups[f] == g for f in fillers)),
                                    **_stats(per_filler[[groups[f] == g for f in fillers]])} for g in names}
    return summary


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["template", "filler", "group", "sentence", "p_positive", "label"])
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], summary: dict, path: Path, title: str, long_list: int = 40, shown: int = 15) -> Path:
    """P(POSITIVE) per filler as a sorted horizontal bar chart with the 0.5 line; past ``long_list``
    fillers, the ``shown`` most positive and most negative, and the distribution of all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fillers = list(dict.fromkeys(r["filler"] for r in rows))
    per_filler = np.mean([[r["p_positive"] for r in rows if r["template"] == t] for t in summary["templates"]], axis=0)
    order = np.argsort(per_filler, kind="stable")  # lowest first: matplotlib draws the first bar at the bottom
    many = len(fillers) > long_list
    chosen = np.concatenate([order[:shown], order[-shown:]]) if many else order
    fig = plt.figure(figsize=(12, 8), dpi=100)
    ax = fig.add_axes([0.27, 0.08, 0.4 if many else 0.68, 0.82])
    values = per_filler[chosen]
    colors = np.where(values > 0.5, "#3a7dc9", "#d0563b")
    y = np.arange(len(chosen)) + (np.arange(len(chosen)) >= shown) * (1 if many else 0)
    ax.barh(y, values, color=colors, height=0.75)
    ax.set_yticks(y, [fillers[i] for i in chosen], fontsize=8 if len(chosen) > 30 else 9)
    for yy, v in zip(y, values):
        if v > 0.88:  # no room right of the bar: the figure goes inside its end
            ax.text(v - 0.01, yy, f"{v:.2f}", va="center", ha="right", fontsize=7, color="white", zorder=3)
        else:
            ax.text(v + 0.01, yy, f"{v:.2f}", va="center", fontsize=7, zorder=3,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1, zorder=2)
    ax.set(xlim=(0, 1), xlabel="P(POSITIVE)", ylim=(-1, y[-1] + 1))
    if many:
        ax.axhline(shown, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"the {shown} lowest and highest of {len(fillers)}", fontsize=10)
        hist = fig.add_axes([0.74, 0.08, 0.23, 0.82])
        bins = histogram_bins(per_filler)
        hist.hist(per_filler, bins=bins, orientation="horizontal", color="#8a8a8a")
        if bins[0] <= 0.5 <= bins[-1]:
            hist.axhline(0.5, color="black", linestyle="--", linewidth=1)
        hist.set(ylim=(bins[0], bins[-1]), xlabel="fillers", ylabel="P(POSITIVE)",
                 title="all fillers" if bins[-1] - bins[0] >= 0.999 else "all fillers (their range)")
    stats = summary["p_positive"]
    fig.suptitle(f"{title}\nspread {stats['spread']:.2f} (min {stats['min']:.2f}, max {stats['max']:.2f}), "
                 f"{_labelled(summary)} labelled POSITIVE", fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram_bins(values: np.ndarray, count: int = 20) -> np.ndarray:
    """``count + 1`` edges over [0, 1], or over the values' own range where it is under half of that,
    so a small spread (0.97 to 0.99) still shows its shape rather than one or two bars."""
    low, high = float(np.min(values)), float(np.max(values))
    if high - low >= 0.5:
        return np.linspace(0.0, 1.0, count + 1)
    margin = max((high - low) * 0.05, 1e-3)
    return np.linspace(max(low - margin, 0.0), min(high + margin, 1.0), count + 1)


def _labelled(summary: dict) -> str:
    """``248 of 249 (99.6%)``: a count, so that one exception is not rounded away."""
    count = round(summary["labelled_positive"] * summary["fillers"])
    return f"{count} of {summary['fillers']} ({summary['labelled_positive']:.1%})"


def console_summary(summary: dict, fillers: Fillers, model: str) -> str:
    stats = summary["p_positive"]
    lines = [f"bias probe: {summary['fillers']} {fillers.name} x {len(summary['templates'])} template(s), model {model}",
             f"fillers from: {fillers.source[:150]}"]
    lines += [f"template: {t!r}" for t in summary["templates"]]
    lines.append(f"P(POSITIVE): min {stats['min']:.3f}  max {stats['max']:.3f}  spread {stats['spread']:.3f}  "
                 f"mean {stats['mean']:.3f}  std {stats['std']:.3f}  labelled POSITIVE {_labelled(summary)}")
    for key in ("most_positive", "most_negative"):
        lines.append(f"{key.replace('_', ' ')}: " + ", ".join(f"{e['filler']} {e['p_positive']:.3f}" for e in summary[key]))
    if len(summary["templates"]) > 1:
        lines += [f"  spread {t['spread']:.3f} for {t['template']!r}" for t in summary["per_template"]]
    for group, figures in summary.get("per_group", {}).items():
        lines.append(f"  {group}: mean {figures['mean']:.3f} (min {figures['min']:.3f}, max {figures['max']:.3f}, "
                     f"{figures['fillers']} filler{'s' if figures['fillers'] != 1 else ''})")
    return "\n".join(lines)


def model_label(model: str) -> str:
    """A short name for the plot title: a hub id as is, a local folder as its last two parts."""
    path = Path(str(model))
    return "/".join(path.parts[-2:]) if path.exists() else str(model)


def run_probe(model: str, templates: list[str], fillers: Fillers, output: Path, dtype: str = "float32",
              batch_size: int | None = None) -> dict:
    """Score, write ``probe.csv``, ``summary.json`` and ``probe.png`` to ``output``; -> the summary."""
    from flaxsst.classifier import Classifier

    classifier = Classifier.from_pretrained(model, dtype=dtype, batch_size=batch_size, key="--model")
    rows = score(classifier, templates, fillers)
    summary = {"model": str(model), "filler_set": fillers.name, "filler_source": fillers.source, **summarize(rows)}
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / "probe.csv")
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    title = " | ".join(templates) if len(templates) <= 2 else f"{len(templates)} templates, mean per filler"
    plot(rows, summary, output / "probe.png", f"{title}  ({fillers.name}, {model_label(model)})")
    return summary


def main(args: argparse.Namespace) -> int:
    output_folder(args.output, "--output")
    if args.probe:
        templates, fillers = load_probe_file(args.probe)
        if args.templates:
            templates = load_templates(args.templates)
    else:
        fillers = load_fillers(args.fillers)
        templates = load_templates(args.templates or [DEFAULT_TEMPLATES.get(fillers.name, DEFAULT_TEMPLATES["countries"])])
    summary = run_probe(args.model, templates, fillers, Path(args.output), args.dtype, args.batch_size)
    print(console_summary(summary, fillers, args.model))
    print(f"wrote {Path(args.output) / 'probe.csv'}, summary.json and probe.png")
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.probe", description=cli.first_paragraph(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=__doc__.strip().split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="export folder, HF folder or hub id")
    p.add_argument("--output", required=True, help="folder for probe.csv, summary.json and probe.png")
    p.add_argument("--templates", nargs="+", help=f"templates holding {PLACEHOLDER}, or .txt/.yaml files of them")
    p.add_argument("--fillers", default="countries", help=f"a filler set ({', '.join(BUILTIN_SETS)}) or a file")
    p.add_argument("--probe", help="a YAML file with 'templates' and 'fillers'")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (default: 32 on a CPU, 128 elsewhere)")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
