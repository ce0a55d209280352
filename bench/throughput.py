"""Train and eval steps of the real model on synthetic batches; one JSON line per case.

    python -m bench.throughput --batch 256 --seq 128 --dtype bf16            # one train + one infer case
    python -m bench.throughput --sweep --png bench/throughput.png            # batch sizes x lengths, and a plot
    python -m bench.throughput --classifier TOKENIZER_DIR                    # Classifier latency on one sentence

DistilBERT-base shapes (768/6/12/3072) with random weights: the same compute as
the hub weights. Train steps are the trainer's own (pmap, AdamW, clip, schedule,
donated state) or a candidate of ``bench.step_variants``; inference is the model's forward. Each case reports
step ms (median of timed windows after warm-up), examples/s, tokens/s, MFU
against a stated peak, the first call's seconds (compile) and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import step_variants
from flaxsst import cli
from flaxsst.config import ModelConfig, load_train_config
from flaxsst.model import Precision, init_params
from flaxsst.parallel import pmap_eval_step, put_batch, replicate

INFER_VARIANTS = ("grouped", "allrows", "stacked")  # the inference cases take these of --variant
RECIPE = Path(__file__).resolve().parents[1] / "conf" / "sst2.yaml"  # the train steps' optimizer and schedule

# Dense peaks (datasheets, no sparsity) per device kind: the H100 SXM's, which the H200 shares; the
# bench also prints the measured bf16 matmul ceiling of ../shared/bench/README.md (~790 TFLOP/s) for
# reference. Another device has no stated peak here, and its MFU is null.
_HOPPER = {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": _HOPPER, "NVIDIA H200": _HOPPER}


def peak_tflops(dtype: str) -> float | None:
    return PEAK_TFLOPS.get(jax.devices()[0].device_kind, {}).get(dtype)


def forward_flops(config: ModelConfig, seq: int, cls_only: bool = True) -> float:
    """Matmul FLOPs of one sequence's forward pass (embeddings lookups excluded), as the classifier
    runs it: the last block computes the [CLS] position only (keys and values for every position;
    ``DistilBertModel(cls_only=True)``); ``cls_only=False``: every position, as transformers does."""
    d, h = config.dim, config.hidden_dim
    per_layer = 8 * seq * d * d + 4 * seq * d * h + 4 * seq * seq * d
    last_layer = 4 * seq * d * d + 4 * d * d + 4 * d * h + 4 * seq * d if cls_only else per_layer
    head = 2 * d * d + 2 * d * config.num_labels
    return (config.n_layers - 1) * per_layer + last_layer + head


def _peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, vocab, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "labels": rng.integers(0, 2, batch).astype(np.int32),
            "weights": np.ones(batch, np.float32)}


def _time(call, steps: int, windows: int = 5) -> list[float]:
    """Median-able per-step seconds over ``windows`` windows of ``steps`` dispatches each."""
    out = []
    for _ in range(windows):
        start = time.perf_counter()
        result = None
        for _ in range(steps):
            result = call()
        jax.block_until_ready(result)
        out.append((time.perf_counter() - start) / steps)
    return out


def bench_case(mode: str, batch: int, seq: int, dtype: str, n_devices: int, steps: int, config: ModelConfig,
               variant: str = "grouped", profile: str | None = None) -> dict:
    precision = Precision(dtype)
    devices = jax.local_devices()[:n_devices]
    if batch % n_devices:
        raise SystemExit(f"--batch {batch} does not divide over {n_devices} devices")
    params = init_params(config, 0)
    device_batch = put_batch(_batch(batch, seq, config.vocab_size), devices)
    train = load_train_config(RECIPE).train
    total_steps = 6315  # the recipe's step count on SST-2's 67,349 training sentences (tests/test_data.py)
    per_device, host_state, per_dispatch, layout = step_variants.build(variant, config, precision, params, train,
                                                                       total_steps)
    if mode == "train":
        step = step_variants.pmapped(per_device, devices)
        state = [replicate(host_state, devices)]
        if per_dispatch > 1:  # the same batch k times: [devices, k, rows / devices, ...]
            device_batch = jax.tree_util.tree_map(lambda x: jnp.stack([x] * per_dispatch, axis=1), device_batch)

        def call():
            state[0], metrics = step(state[0], device_batch)
            return metrics
    else:
        forward = pmap_eval_step(step_variants.model_for(variant, config, precision), layout, devices)
        placed = replicate(host_state.params, devices)

        def call():
            return forward(placed, device_batch)
    start = time.perf_counter()
    jax.block_until_ready(call())
    first_call = time.perf_counter() - start
    for _ in range(3):
        jax.block_until_ready(call())
    step_s = statistics.median(_time(call, steps)) / per_dispatch
    trace = None
    if profile:
        trace = profile_summary(call, steps, per_dispatch, f"{profile}/{mode}-{variant}-b{batch}-s{seq}-{dtype}")
    flops = forward_flops(config, seq, variant != "allrows") * batch * (3 if mode == "train" else 1)
    peak = peak_tflops(jnp.dtype(precision.dtype).name)
    return {
        "what": f"flaxsst_{mode}", "variant": variant, "batch": batch, "seq": seq, "dtype": jnp.dtype(precision.dtype).name,
        "devices": n_devices, "step_ms": round(step_s * 1e3, 3), "examples_per_s": round(batch / step_s, 1),
        "tokens_per_s": round(batch * seq / step_s), "tflops": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / 1e12 / peak, 3) if peak else None, "peak_tflops": peak,
        "first_call_s": round(first_call, 2), "peak_memory_gb": (round(_peak_memory() / 2**30, 2) if _peak_memory() else None),
        **({"profile": trace} if trace else {}),
    }


def summarize_trace(trace_file: str, dispatches: int, steps_per_dispatch: int = 1, top: int = 12) -> dict:
    """A perfetto trace (``jax.profiler.trace(..., create_perfetto_trace=True)``) -> per-step figures.

    For each line (thread) of each device track (``/device:...``; the GPU's lines are its
    streams plus derived ones such as "XLA Ops" and "XLA Modules"): events per step, busy ms
    per step (the union of the events' intervals) and the span from the first event's start to
    the last one's end per step -- busy/span on a stream line says how much of the time the GPU
    spends in kernels at all -- and the events taking the most time. For the host: ms per
    dispatch of the Python-side call.
    """
    import gzip

    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    steps = dispatches * steps_per_dispatch
    out: dict = {"steps": steps}
    lines: dict = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            lines.setdefault((e["pid"], e.get("tid")), []).append(e)
    for (pid, tid), evs in sorted(lines.items(), key=lambda kv: str(kv[0])):
        process = processes.get(pid, str(pid))
        if process.startswith("/device:"):
            spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in evs)
            busy, end = 0.0, -1e30
            for a, b in spans:
                if b > end:
                    busy += b - max(a, end)
                    end = b
            totals: dict = {}
            for e in evs:
                totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"]
            out[f"{process} | {threads.get((pid, tid), tid)}"] = {
                "events_per_step": round(len(evs) / steps, 1),
                "busy_ms_per_step": round(busy / 1e3 / steps, 4),
                "span_ms_per_step": round((spans[-1][1] - spans[0][0]) / 1e3 / steps, 4),
                "top_us_per_step": {k[:80]: round(v / steps, 1)
                                    for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]},
            }
        else:
            calls = [e for e in evs if e["name"].startswith(("PmapFunction", "PjitFunction"))]
            if calls:
                out["host_dispatch_ms"] = round(out.get("host_dispatch_ms", 0.0) + sum(e["dur"] for e in calls) / 1e3 / dispatches, 4)
    return out


def profile_summary(call, dispatches: int, steps_per_dispatch: int, log_dir: str) -> dict:
    """Trace ``dispatches`` calls of a warmed-up ``call`` and summarize them."""
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        result = None
        for _ in range(dispatches):
            result = call()
        jax.block_until_ready(result)
    return summarize_latest_trace(log_dir, dispatches, steps_per_dispatch)


def summarize_latest_trace(log_dir: str, dispatches: int, steps_per_dispatch: int = 1) -> dict:
    """``summarize_trace`` of the newest perfetto trace under ``log_dir`` (or an error entry)."""
    import glob

    files = sorted(glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True))
    if not files:
        return {"error": f"no perfetto trace under {log_dir}"}
    return summarize_trace(files[-1], dispatches, steps_per_dispatch)


def bench_classifier(tokenizer_dir: str, config: ModelConfig, dtype: str, calls: int = 300, variant: str = "classifier") -> dict:
    """``Classifier`` (or the ``packed`` candidate of bench/classifier_variants.py) on one short
    sentence: first call, warm wall time, and the part of it that is the jitted forward alone
    (on device-resident inputs, blocking), so the rest is tokenization, copies and Python."""
    from flaxsst import Classifier
    from flaxsst.tokenizer import Tokenizer

    cls = Classifier
    if variant == "packed":
        from bench.classifier_variants import PackedClassifier as cls
    clf = cls(config, init_params(config, 0), Tokenizer.from_pretrained(tokenizer_dir), max_length=128, dtype=dtype)
    text = ["Today was an amazing day!"]
    start = time.perf_counter()
    clf(text)
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        clf(text)
        times.append(time.perf_counter() - start)
    from flaxsst.tokenizer import pad_right

    ids = clf.tokenizer.encode(text)
    length = clf.shapes.padded_length(len(ids[0]))  # the length the calls above used
    placed = jax.device_put(pad_right(ids, 1, length, clf.tokenizer.pad_id))
    forward = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(clf.forward(clf.params, *placed))
        forward.append(time.perf_counter() - start)
    return {"what": "flaxsst_classifier_one_sentence", "variant": variant, "dtype": jnp.dtype(Precision(dtype).dtype).name,
            "tokens": len(ids[0]), "warm_ms_median": round(statistics.median(times) * 1e3, 3),
            "warm_ms_p90": round(float(np.percentile(times, 90)) * 1e3, 3), "first_call_s": round(first, 2),
            "forward_only_ms_median": round(statistics.median(forward) * 1e3, 3)}


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("train", "infer")):
        for seq in sorted({r["seq"] for r in rows}):
            for variant in sorted({r["variant"] for r in rows}):
                points = sorted((r["batch"], r["examples_per_s"]) for r in rows
                                if r["what"] == f"flaxsst_{mode}" and r["seq"] == seq and r["variant"] == variant)
                if points:
                    ax.plot(*zip(*points), "o-", label=f"seq {seq}, {variant}")
        ax.set(xscale="log", xlabel="batch size", ylabel="examples / s", title=f"{mode} ({rows[0]['dtype']}, {jax.devices()[0].device_kind})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=cli.first_paragraph(__doc__))
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--seq", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    parser.add_argument("--devices", type=int, default=jax.local_device_count())
    parser.add_argument("--steps", type=int, default=20, help="dispatches per timed window")
    parser.add_argument("--sweep", action="store_true", help="batch 32..512 (train) / 64..2048 (infer) at seq 32, 64, 128")
    parser.add_argument("--png", help="plot of examples/s against batch size")
    parser.add_argument("--classifier", metavar="TOKENIZER_DIR", help="also time Classifier on one sentence")
    parser.add_argument("--variant", nargs="+", default=["grouped"],
                        help="candidates of bench.step_variants: grouped (the trainer's), tree, flat, stacked, allrows, "
                        "scan<k>, <layout>_scan<k>; inference takes grouped, allrows and stacked")
    parser.add_argument("--profile", metavar="DIR", help="trace each case's timed steps; adds per-step kernel counts, "
                        "device busy time and the top kernels to its JSON")
    args = parser.parse_args()

    config = ModelConfig()  # DistilBERT-base
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                      "devices": args.devices}), flush=True)
    cases = []
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    if args.sweep:
        for seq in (32, 64, 128):
            cases += [("train", b, seq) for b in (32, 64, 128, 256, 512)]
            cases += [("infer", b, seq) for b in (64, 256, 1024, 2048)]
    else:
        cases = [(m, b, s) for m in modes for b in args.batch for s in args.seq]
    rows = []
    for mode, batch, seq in cases:
        for variant in (args.variant if mode == "train" else [v for v in args.variant if v in INFER_VARIANTS] or ["grouped"]):
            row = bench_case(mode, batch, seq, args.dtype, args.devices, args.steps, config, variant, args.profile)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.png and rows:
        plot_sweep(rows, args.png)
    if args.classifier:
        for dtype in ("bf16", "fp32"):
            for variant in ("classifier", "packed"):
                print(json.dumps(bench_classifier(args.classifier, config, dtype, variant=variant)), flush=True)


if __name__ == "__main__":
    main()
