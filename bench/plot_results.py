"""Bar chart of flaxsst against the PyTorch anchor for each workload of a results JSONL file.

    python -m bench.plot_results bench/results/h100-2026-11-22.jsonl bench/results/h100-2026-11-22.png
"""

import json
import sys


def pick(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    raise KeyError(match)


def main(src: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.startswith("{")]
    for row in rows:  # a row without these keys ran pmap and JAX's default PRNG
        if row.get("what", "").startswith("flaxsst_"):
            row.setdefault("prng", "threefry2x32")
            row.setdefault("parallel", "pmap")
    torch_epoch = pick(rows, what="torch_finetune")
    workloads = [
        ("train b32 s128\n(ex/s)", pick(rows, what="torch_train", mode="bf16", batch=32, compile=True)["examples_per_s"],
         pick(rows, what="flaxsst_train", parallel="pmap", batch=32, seq=128, prng="threefry2x32")["examples_per_s"]),
        ("train b256 s128\n(ex/s)", pick(rows, what="torch_train", mode="bf16", batch=256)["examples_per_s"],
         pick(rows, what="flaxsst_train", parallel="pmap", batch=256, prng="threefry2x32")["examples_per_s"]),
        ("infer b1024 s128\n(ex/s)", pick(rows, what="torch_infer", mode="bf16", batch=1024, compile=True)["examples_per_s"],
         pick(rows, what="flaxsst_infer", batch=1024)["examples_per_s"]),
        ("SST-2 recipe\n(examples/s of training)", torch_epoch["examples_per_s"],
         pick(rows, what="flaxsst_recipe", config="conf/sst2.yaml")["examples_per_s"]),
        ("one sentence\n(calls/s)", 1000 / pick(rows, what="torch_infer", mode="bf16", batch=1)["step_ms"],
         1000 / pick(rows, what="flaxsst_classifier_one_sentence", dtype="bfloat16")["warm_ms_median"]),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(workloads))
    ratios = [ours / anchor for _, anchor, ours in workloads]
    ax.bar([x - 0.2 for x in xs], [1.0] * len(workloads), 0.4, label="PyTorch bf16 (anchor, same session)")
    ax.bar([x + 0.2 for x in xs], ratios, 0.4, label="flaxsst bf16")
    for x, ratio in zip(xs, ratios):
        ax.annotate(f"{ratio:.2f}x", (x + 0.2, ratio), ha="center", va="bottom")
    ax.set_xticks(list(xs), [name for name, _, _ in workloads])
    ax.set_ylabel("throughput relative to the anchor")
    ax.set_title("DistilBERT-base shapes on one H100 (higher is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
