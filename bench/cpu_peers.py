"""flaxsst's Classifier against every CPU peer a careful user would run, in one process, on the same texts.

    python -m bench.cpu_peers --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english \\
        --texts ../shared/data/sst2/dev.tsv

Peers: PyTorch fp32, PyTorch bf16 autocast (oneDNN), ONNX Runtime fp32 (plain, and with
``onnxruntime.transformers``' BERT fusions), and the int8 models users pick: ONNX Runtime's
``quantize_dynamic`` of the fused model and PyTorch's dynamic quantization of its Linear layers
(``torch.ao.quantization.quantize_dynamic``, qint8 weights). Every peer gets the fair batching: the texts sorted by
length, batches padded to their own longest, at each of ``--peer-batch-sizes`` (its best counts; the
default includes flaxsst's own CPU batch size);
flaxsst runs as a user calls it (``Classifier.logits(texts)``, tokenization included), in float32, bfloat16
and int8; ``--peers`` picks the peers. The same random
DistilBERT-base weights for all, ``--threads`` threads each. Also latency, one text a call, text in
and logits out (a peer's call tokenizes with the same ``tokenizers`` WordPiece as flaxsst's): one
fixed sentence (median and p99 of ``--latency-calls`` calls), and every one of the texts in turn, the
endpoint's traffic (median, p99, mean, and the median by token count); and a fresh process's first
prediction, with an empty compilation cache and with a warm one. The timed runs take turns, one of
each runner a round, so a change in the machine's load falls on every runner alike: ``--repeats``
rounds of the texts (each runner's best counts), ``--latency-rounds`` of each latency (all calls count).
Prints JSON lines; the last, ``summary``, has the ratios.

    python -m bench.cpu_peers --plot-from RESULTS.jsonl --png OUT.png     # the chart of a saved run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEERS = ("torch_fp32", "torch_bf16", "torch_int8", "ort_fp32", "ort_fused_fp32", "ort_fused_int8")
ONE_SENTENCE = "Today was an amazing day, and the film was better than I expected!"


def read_texts(path: str) -> list[str]:
    """The ``sentence`` column of a GLUE ``.tsv``, or one text per line of any other file."""
    if path.endswith(".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return Path(path).read_text(encoding="utf-8").splitlines()


def cpu_facts() -> dict:
    """``lscpu``'s model name, its vector/matrix flags that matter here, and the core count."""
    facts = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if os.environ.get("FLAXSST_BENCH_CPU_NOTE"):  # bench/avx2_only.py: lscpu still lists the hidden flags
        facts["note"] = os.environ["FLAXSST_BENCH_CPU_NOTE"]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return facts
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    facts["cpu"] = fields.get("Model name", facts["cpu"]).strip()
    facts["flags"] = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    return facts


def fair_batches(ids: list[list[int]], batch_size: int):
    """The texts sorted by length, ``batch_size`` at a time, each padded to its own longest:
    ``(indices, input_ids, attention_mask)`` int64."""
    order = np.argsort([len(seq) for seq in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(ids[i]) for i in chunk)
        input_ids = np.zeros((len(chunk), longest), np.int64)
        mask = np.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        yield chunk, input_ids, mask


def best_seconds_in_turns(runs: dict, rounds: int) -> dict:
    """Each of ``runs`` once a round, ``rounds`` times, after one untimed call each: its best seconds."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def random_model_dir(tokenizer_dir: str, prefix: str):
    """A temporary HF folder with random DistilBERT-base weights (seed 0) and ``tokenizer_dir``'s tokenizer:
    ``(folder, the transformers model)``."""
    import torch
    import transformers

    from flaxsst.tokenizer import Tokenizer

    work = tempfile.mkdtemp(prefix=prefix)
    torch.manual_seed(0)
    reference = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(num_labels=2)).eval()
    reference.save_pretrained(work)
    Tokenizer.from_pretrained(tokenizer_dir, 512).save_pretrained(work)
    return work, reference


def export_onnx(reference, ids: list[list[int]], path: str) -> None:
    """``reference`` as ONNX (opset 17) with dynamic batch and length axes, traced on a fair batch of ``ids``."""
    import torch

    _, ids0, mask0 = next(fair_batches(ids, 8))
    torch.onnx.export(reference, (torch.from_numpy(ids0), torch.from_numpy(mask0)), path,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}},
                      opset_version=17, dynamo=False)


def fused_int8(onnx_path: str) -> str:
    """Beside ``onnx_path`` (``X.onnx``): ``X_fused.onnx``, ONNX Runtime's BERT fusions of it, and
    ``X_fused_int8.onnx``, that quantized by ``quantize_dynamic`` (int8 weights): the int8 model a careful
    user builds. -> the int8 model's path."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    stem = onnx_path.removesuffix(".onnx")
    fused = optimize_model(onnx_path, model_type="bert", num_heads=12, hidden_size=768)
    fused.save_model_to_file(f"{stem}_fused.onnx")
    # the fused graph's com.microsoft ops leave ONNX's shape inference without types: float32 is what they carry
    quantize_dynamic(f"{stem}_fused.onnx", f"{stem}_fused_int8.onnx", weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return f"{stem}_fused_int8.onnx"


def ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session as a careful user sets one up: ``threads`` intra-op threads, every graph
    optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latency_in_turns(runs: dict, texts: list[str], rounds: int) -> dict:
    """Each of ``runs`` (one text -> logits) called on every one of ``texts`` in a round, runners in turns,
    ``rounds`` times, after one untimed pass each (it compiles what it needs): every call's seconds."""
    for fn in runs.values():
        for text in texts:
            fn(text)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            for text in texts:
                start = time.perf_counter()
                fn(text)
                times[name].append(time.perf_counter() - start)
    return times


def latency_figures(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(np.mean(ms)), 2)}


def by_tokens(seconds: list[float], tokens: list[int], width: int = 8) -> dict:
    """Median milliseconds of the calls whose text has ``tokens`` in each bucket ``[k*width, (k+1)*width)``,
    keyed by the bucket's first count: ``seconds`` holds whole rounds over the texts, in order."""
    counts = np.resize(np.asarray(tokens) // width * width, len(seconds))
    ms = 1000 * np.asarray(seconds)
    return {int(b): round(float(np.median(ms[counts == b])), 2) for b in np.unique(counts)}


COLD_START = """
import sys, time
start = time.perf_counter()
from flaxsst import Classifier
clf = Classifier.from_pretrained(sys.argv[1])
loaded = time.perf_counter()
clf([sys.argv[2]])
done = time.perf_counter()
print(round(loaded - start, 3), round(done - loaded, 3))
"""


def cold_start(model_dir: str, cache_dir: str) -> dict:
    """A fresh process: import and load, then its first prediction, against the compilation cache ``cache_dir``
    (and the compiled packed-dot kernel under it: an empty cache builds it while loading)."""
    env = dict(os.environ, FLAXSST_CACHE_DIR=cache_dir, FLAXSST_COMPILATION_CACHE="1",
               FLAXSST_KERNEL_DIR=os.path.join(cache_dir, "kernels"))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", COLD_START, model_dir, ONE_SENTENCE], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return {"process_s": round(time.perf_counter() - start, 3), "load_s": float(out[0]), "first_prediction_s": float(out[1])}


def plot(records: list[dict], path: str) -> None:
    """Bar charts of a run: seconds for the texts per runner, and one sentence's median latency; and,
    where the run has it, each runner's median latency by token count over the texts one at a time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = next(r for r in records if r["what"] == "meta")
    texts = sorted((r for r in records if r["what"] == "texts"), key=lambda r: r["seconds"])
    single = sorted((r for r in records if r["what"] == "one_sentence"), key=lambda r: r["median_ms"])
    traffic = sorted((r for r in records if r["what"] == "one_at_a_time"), key=lambda r: r["median_ms"])
    ratios = [3, 2, 3] if traffic else [3, 2]
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.8), gridspec_kw={"width_ratios": ratios})
    for axis, rows, key, label in ((axes[0], texts, "seconds", f"seconds for {meta['texts']} SST-2 dev sentences"),
                                   (axes[1], single, "median_ms", "one sentence, median ms")):
        names = [r["runner"] for r in rows]
        colors = ["tab:orange" if n.startswith("flaxsst") else "tab:gray" for n in names]
        axis.barh(names, [r[key] for r in rows], color=colors)
        axis.invert_yaxis()
        axis.set_xlabel(label + " (lower is better)")
        for y, r in enumerate(rows):
            axis.text(r[key], y, f" {r[key]:g}", va="center", fontsize=8)
    if traffic:
        axis = axes[2]
        for r in traffic:
            buckets = sorted(r["median_ms_by_tokens"].items(), key=lambda item: int(item[0]))
            axis.plot([int(b) for b, _ in buckets], [ms for _, ms in buckets], marker="o", markersize=3,
                      label=f"{r['runner']} (median {r['median_ms']:g})",
                      linewidth=2.2 if r["runner"].startswith("flaxsst") else 1.2)
        axis.set_xlabel(f"tokens (buckets of 8), each of the {traffic[0]['texts']} sentences a call")
        axis.set_ylabel("median ms (lower is better)")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    note = f"\n{meta['note']}" if meta.get("note") else ""
    fig.suptitle(f"CPU inference, DistilBERT-base, {meta['date']}: {meta['cpu']}, {meta['threads']} threads "
                 f"(runner@N: a peer batched N at a time, sorted, padded to each batch's longest){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot-from", help="draw the chart of this saved run's JSON lines (with --png) and stop")
    parser.add_argument("--png", help="write the run's chart here")
    parser.add_argument("--tokenizer-dir", help="folder with tokenizer.json / vocab.txt")
    parser.add_argument("--texts", help="a GLUE .tsv (its sentence column) or a file of one text per line")
    parser.add_argument("--peer-batch-sizes", type=int, nargs="+", default=[128, 32, 24])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, every runner once a round")
    parser.add_argument("--latency-calls", type=int, default=200, help="calls on the fixed sentence, all rounds together")
    parser.add_argument("--latency-rounds", type=int, default=2, help="rounds of each latency, every runner once a round")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="leave flaxsst bf16 out (a CPU without bf16 units)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, help="the peers to run (default: all)")
    args = parser.parse_args()
    if args.plot_from:
        if not args.png:
            parser.error("--plot-from needs --png")
        plot([json.loads(line) for line in Path(args.plot_from).read_text().splitlines() if line.strip()], args.png)
        return
    if not (args.tokenizer_dir and args.texts):
        parser.error("--tokenizer-dir and --texts are required for a run")
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    import jax
    import jax.numpy as jnp
    import onnxruntime as ort
    import tokenizers
    import torch
    import transformers

    from flaxsst import Classifier

    torch.set_num_threads(args.threads)
    texts = read_texts(args.texts)
    work, reference = random_model_dir(args.tokenizer_dir, "cpu_peers_")
    flax_fp32 = Classifier.from_pretrained(work)
    flax_bf16 = None if args.no_bf16 else Classifier.from_pretrained(work, dtype=jnp.bfloat16)
    flax_int8 = Classifier.from_pretrained(work, dtype="int8")
    ids = flax_fp32.encode(texts)
    one_ids = flax_fp32.encode([ONE_SENTENCE])
    meta = {"date": time.strftime("%Y-%m-%d"), **cpu_facts(), "threads": args.threads, "texts": len(texts),
            "real_tokens": sum(map(len, ids)), "jax": jax.__version__, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "transformers": transformers.__version__}
    emit({"what": "meta", **meta})

    def torch_fn(bf16: bool, model=None):
        model = reference if model is None else model

        def run(input_ids, mask):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
        return run

    onnx_path = f"{work}/model.onnx"
    export_onnx(reference, ids, onnx_path)
    fused_int8(onnx_path)
    sessions = {"ort_fp32": ort_session(onnx_path, args.threads),
                "ort_fused_fp32": ort_session(f"{work}/model_fused.onnx", args.threads),
                "ort_fused_int8": ort_session(f"{work}/model_fused_int8.onnx", args.threads)}
    torch_int8 = torch.ao.quantization.quantize_dynamic(reference, {torch.nn.Linear}, dtype=torch.qint8)

    def ort_fn(sess):
        return lambda input_ids, mask: sess.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]

    peers = {"torch_fp32": torch_fn(False), "torch_bf16": torch_fn(True), "torch_int8": torch_fn(False, torch_int8),
             **{name: ort_fn(sess) for name, sess in sessions.items()}}
    peers = {name: fn for name, fn in peers.items() if name in args.peers}

    def gather(fn, batch_size):
        out = np.zeros((len(ids), 2), np.float32)
        for chunk, input_ids, mask in fair_batches(ids, batch_size):
            out[chunk] = fn(input_ids, mask)
        return out

    truth = gather(torch_fn(False), 32)
    flax_serial = Classifier.from_pretrained(work, concurrent_batches=1)  # the lever: one batch at a time
    runs = {"flaxsst_fp32": lambda: flax_fp32.logits(texts), "flaxsst_bf16": lambda: flax_bf16.logits(texts),
            "flaxsst_int8": lambda: flax_int8.logits(texts),
            "flaxsst_fp32_one_batch_at_a_time": lambda: flax_serial.logits(texts)}
    ours = [name for name in ("flaxsst_fp32", "flaxsst_bf16", "flaxsst_int8") if name != "flaxsst_bf16" or flax_bf16 is not None]
    runs = {name: fn for name, fn in runs.items() if name != "flaxsst_bf16" or flax_bf16 is not None}
    for name, fn in peers.items():
        for batch_size in args.peer_batch_sizes:
            runs[f"{name}@{batch_size}"] = lambda fn=fn, batch_size=batch_size: gather(fn, batch_size)
    for name in ours:  # first calls compile: timed apart
        start = time.perf_counter()
        runs[name]()
        programs = {(batch.rows, batch.length) for batch in flax_fp32.shapes.plan([len(seq) for seq in ids])}
        emit({"what": "first_call", "runner": name, "seconds": round(time.perf_counter() - start, 2),
              "programs": len(programs)})
    outputs = {name: fn() for name, fn in runs.items()}  # the untimed call of each
    seconds = best_seconds_in_turns(runs, args.repeats)
    for name, got in outputs.items():
        emit({"what": "texts", "runner": name, "seconds": round(seconds[name], 3),
              "texts_per_s": round(len(texts) / seconds[name], 1),
              "max_abs_logit_diff_vs_torch_fp32": float(np.abs(got - truth).max()),
              "label_agreement_vs_torch_fp32": float(np.mean(got.argmax(1) == truth.argmax(1)))})

    wordpiece = tokenizers.Tokenizer.from_file(f"{work}/tokenizer.json")  # what a careful peer user tokenizes with

    def peer_text_fn(fn):
        def run(text):
            input_ids = np.asarray([wordpiece.encode(text).ids], np.int64)
            return fn(input_ids, np.ones_like(input_ids))
        return run

    single = {"flaxsst_fp32": lambda text: flax_fp32.logits([text]), "flaxsst_bf16": lambda text: flax_bf16.logits([text]),
              "flaxsst_int8": lambda text: flax_int8.logits([text]),
              **{name: peer_text_fn(fn) for name, fn in peers.items()}}
    single = {name: fn for name, fn in single.items() if name != "flaxsst_bf16" or flax_bf16 is not None}
    if [wordpiece.encode(text).ids for text in texts] != ids:
        raise SystemExit(f"{work}/tokenizer.json does not give the peers flaxsst's token ids")
    calls_per_round = max(1, args.latency_calls // args.latency_rounds)
    fixed = latency_in_turns(single, [ONE_SENTENCE] * calls_per_round, args.latency_rounds)
    latency = {}
    for name, seconds_of_calls in fixed.items():
        latency[name] = latency_figures(seconds_of_calls)
        emit({"what": "one_sentence", "runner": name, "tokens": len(one_ids[0]), **latency[name]})
    token_counts = [len(seq) for seq in ids]
    traffic = latency_in_turns(single, texts, args.latency_rounds)
    one_at_a_time = {}
    for name, seconds_of_calls in traffic.items():
        one_at_a_time[name] = latency_figures(seconds_of_calls)
        one_by_one = np.concatenate([single[name](text) for text in texts])  # untimed: the logits of one-text calls
        emit({"what": "one_at_a_time", "runner": name, "texts": len(texts), "calls": len(seconds_of_calls),
              **one_at_a_time[name], "median_ms_by_tokens": by_tokens(seconds_of_calls, token_counts),
              "max_abs_logit_diff_vs_torch_fp32": float(np.abs(one_by_one - truth).max())})

    if not args.skip_cold_start:
        cache = tempfile.mkdtemp(prefix="cpu_peers_cache_")
        for state in ("empty_cache", "warm_cache"):
            emit({"what": "cold_start", "cache": state, **cold_start(work, cache)})

    def fastest(prefixes, figures=None):  # the fastest peer of these kinds that ran: (name, its figure)
        figures = seconds if figures is None else figures
        candidates = {k: v for k, v in figures.items() if k.startswith(prefixes)}
        if not candidates:
            return None, None
        name = min(candidates, key=candidates.get)
        return name, candidates[name]

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b is not None else None

    fp32_peers, int8_peers = ("torch_fp32", "ort_fp32", "ort_fused_fp32"), ("torch_int8", "ort_fused_int8")
    fp32_peer, fp32_peer_s = fastest(fp32_peers)
    bf16_peer, bf16_peer_s = fastest(("torch_bf16",))
    int8_peer, int8_peer_s = fastest(int8_peers)
    medians = {name: figures["median_ms"] for name, figures in latency.items()}
    traffic = {name: figures["median_ms"] for name, figures in one_at_a_time.items()}
    one_peer, one_peer_ms = fastest(fp32_peers, medians)
    one_int8_peer, one_int8_peer_ms = fastest(int8_peers, medians)
    traffic_peer, traffic_peer_ms = fastest(fp32_peers, traffic)
    traffic_int8_peer, traffic_int8_peer_ms = fastest(int8_peers, traffic)
    fp32_logits, int8_logits = flax_fp32.logits(texts), flax_int8.logits(texts)
    bf16_logits = flax_bf16.logits(texts) if flax_bf16 is not None else None
    emit({
        "what": "summary",
        "fastest_fp32_peer": fp32_peer, "flaxsst_fp32_time_vs_it": ratio(seconds["flaxsst_fp32"], fp32_peer_s),
        "fastest_bf16_peer": bf16_peer, "flaxsst_bf16_time_vs_it": ratio(seconds.get("flaxsst_bf16"), bf16_peer_s),
        "fastest_int8_peer": int8_peer, "flaxsst_int8_time_vs_it": ratio(seconds["flaxsst_int8"], int8_peer_s),
        "flaxsst_fp32_time_vs_int8_peer": ratio(seconds["flaxsst_fp32"], int8_peer_s),
        "flaxsst_bf16_time_vs_int8_peer": ratio(seconds.get("flaxsst_bf16"), int8_peer_s),
        **({} if bf16_logits is None else {
            "flaxsst_bf16_vs_fp32_label_agreement": float(np.mean(bf16_logits.argmax(1) == fp32_logits.argmax(1))),
            "flaxsst_bf16_vs_fp32_max_abs_logit_diff": float(np.abs(bf16_logits - fp32_logits).max())}),
        "flaxsst_int8_vs_fp32_label_agreement": float(np.mean(int8_logits.argmax(1) == fp32_logits.argmax(1))),
        "flaxsst_int8_vs_fp32_max_abs_logit_diff": float(np.abs(int8_logits - fp32_logits).max()),
        "one_sentence_fastest_peer": one_peer,
        "one_sentence_flaxsst_fp32_vs_it": ratio(medians["flaxsst_fp32"], one_peer_ms),
        "one_sentence_fastest_int8_peer": one_int8_peer,
        "one_sentence_flaxsst_int8_vs_it": ratio(medians["flaxsst_int8"], one_int8_peer_ms),
        "one_at_a_time_fastest_peer": traffic_peer,
        "one_at_a_time_flaxsst_fp32_median_vs_it": ratio(traffic["flaxsst_fp32"], traffic_peer_ms),
        "one_at_a_time_fastest_int8_peer": traffic_int8_peer,
        "one_at_a_time_flaxsst_int8_median_vs_it": ratio(traffic["flaxsst_int8"], traffic_int8_peer_ms),
    })
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
