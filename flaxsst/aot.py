"""Compile a run's train and eval programs for a TPU slice that is not there, and say what each
chip needs: will it compile, does it fit, how many kernels does a step launch.

    python -m flaxsst.aot --config conf/sst2.yaml --topology v5e:2x4 [key=value ...] [--hlo DIR]

The model, parameter layout, optimizer and ``pmap`` mapping are the trainer's own
(``run_setup.build_steps``), built from shapes alone: no data is read and no weight is loaded (the
model's ``config.json`` is read where ``model.pretrained`` names one). For every length bucket the train
and the eval program are compiled by libtpu (the ``tpu`` extra) on this machine's CPU, and each
prints a JSON line: per-chip memory against the chip's HBM, FLOPs and bytes (XLA's cost analysis),
a roofline estimate of the step time, the kernels one call launches (``flaxsst.hlo``) and the compile
time; a table follows. Estimates are labelled as such: max(FLOPs / peak, bytes / bandwidth) is a
lower bound a real step approaches only when it is large.

A slice is ``GEN:AxB[xC]`` (``v5e:2x4``, ``v4:2x2x1``) or a Cloud name (``v5e-8``, ``v4-8``, ``v5p-8``,
``v6e-256``); ``--chips-per-host`` sets the hosts (default: one host up to 8 chips for v5e/v6e, 4
chips per host otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from flaxsst import cli
from flaxsst.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (Google Cloud's TPU documentation)."""

    generation: str
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    topology_prefix: str  # as libtpu names the generation in a topology
    chip_config: str  # "megacore": one device per chip of two TensorCores
    cores_per_chip: int  # the "-N" of a Cloud name counts TensorCores for these


CHIPS = {
    "v4": Chip("v4", 32 * 2**30, 275e12, 1228e9, "v4", "megacore", 2),
    "v5e": Chip("v5e", 16 * 2**30, 197e12, 819e9, "v5e", "default", 1),
    "v5p": Chip("v5p", 95 * 2**30, 459e12, 2765e9, "v5", "megacore", 2),
    "v6e": Chip("v6e", 32 * 2**30, 918e12, 1640e9, "v6e", "default", 1),
}
SST2_TRAIN_EXAMPLES = 67_349


@dataclasses.dataclass(frozen=True)
class Slice:
    chip: Chip
    shape: tuple[int, ...]
    chips_per_host: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)


def known_slices() -> str:
    return ("GEN:AxB for v5e and v6e (v5e:2x2, v5e:2x4, v5e:16x16), GEN:AxBxC for v4 and v5p (v4:2x2x1, v5p:2x2x2), "
            "or Cloud names (v5e-8 or gcloud's v5litepod-8, v6e-256, v4-8, v5p-8) with GEN one of " + ", ".join(CHIPS))


# The shapes of Cloud slices by chip count (the TPU documentation's tables).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
             512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


def _shape_for_chips(chip: Chip, chips: int) -> tuple[int, ...]:
    return (SHAPES_3D if chip.cores_per_chip == 2 else SHAPES_2D).get(chips, ())


def parse_slice(name: str, chips_per_host: int | None = None) -> Slice:
    """``v5e:2x4`` / ``v5e-8`` / ``v4-8`` -> the slice (any case; gcloud's ``v5litepod-8`` is ``v5e-8``);
    an unknown name is a ``ConfigError`` listing the forms."""
    given, name = name, re.sub(r"^v5litepod", "v5e", name.strip().lower())
    cloud = re.fullmatch(r"(v\d\w?)-(\d+)", name)
    explicit = re.fullmatch(r"(v\d\w?):(\d+(?:x\d+){1,2})", name)
    generation = (cloud or explicit).group(1) if (cloud or explicit) else None
    chip = CHIPS.get(generation or "")
    if chip is None:
        raise ConfigError(f"--topology {given}: unknown TPU slice; expected {known_slices()}")
    if cloud:
        chips = int(cloud.group(2)) // chip.cores_per_chip
        shape = _shape_for_chips(chip, chips)
        if not shape:
            raise ConfigError(f"--topology {given}: no {chip.generation} slice of {chips} chips; expected {known_slices()}")
    else:
        shape = tuple(int(n) for n in explicit.group(2).split("x"))
        if len(shape) != (3 if chip.cores_per_chip == 2 else 2):
            raise ConfigError(f"--topology {given}: {chip.generation} slices have {3 if chip.cores_per_chip == 2 else 2} "
                              f"dimensions; expected {known_slices()}")
        if _shape_for_chips(chip, math.prod(shape)) != shape and tuple(sorted(shape)) != _shape_for_chips(chip, math.prod(shape)):
            shapes = ", ".join("x".join(map(str, s)) for s in (SHAPES_3D if chip.cores_per_chip == 2 else SHAPES_2D).values())
            raise ConfigError(f"--topology {given}: not a {chip.generation} slice; its shapes are {shapes}")
    chips = math.prod(shape)
    if chips_per_host is None:
        chips_per_host = chips if chip.cores_per_chip == 1 and chips <= 8 else min(chips, 4)
    per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips_per_host)
    if per_host is None or chips % chips_per_host:
        raise ConfigError(f"--chips-per-host {chips_per_host}: expected 1, 4 or 8, dividing the slice's {chips} chips")
    return Slice(chip, shape, per_host)


def topology_devices(slice_: Slice) -> list:
    """The slice's compile-only devices, from libtpu (``ConfigError`` naming the extra where it is missing)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("compiling for a TPU needs libtpu: pip install -e '.[tpu]' (the libtpu that matches the "
                          "installed jax)")
    import signal
    import threading

    from jax.experimental import topologies

    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=f"{slice_.chip.topology_prefix}:{'x'.join(map(str, slice_.shape))}",
            chip_config_name=slice_.chip.chip_config, chips_per_host_bounds=slice_.chips_per_host, num_slices=1,
        ).devices
    except Exception as e:  # libtpu's own words for a shape it does not build
        raise ConfigError(f"--topology {slice_.name}: libtpu cannot build it ({str(e).splitlines()[0][:200]}); "
                          f"expected {known_slices()}") from None
    finally:
        if sigterm is not None:  # libtpu installs a crash reporter for SIGTERM; a stop is not a crash
            signal.signal(signal.SIGTERM, sigterm)


# ---- compiling ------------------------------------------------------------------------------

def model_config_of(config) -> Any:
    """The model's shapes: ``model.pretrained``'s config.json (no weights), or a random init's
    (``model.config`` over DistilBERT-base, the vocabulary of ``model.tokenizer`` or BERT's 30,522)."""
    from flaxsst.config import ModelConfig
    from flaxsst.run_setup import build_tokenizer, model_overrides

    if config.model.pretrained:
        from flaxsst.convert import CONFIG_NAME, _read_json, config_from_hf
        from flaxsst.hub import resolve_model_dir

        path = resolve_model_dir(config.model.pretrained, key="model.pretrained") / CONFIG_NAME
        return config_from_hf(_read_json(path), str(path), **model_overrides(config))[0]
    vocab_size = build_tokenizer(config, Path(".")).vocab_size if config.model.tokenizer else 30522
    return ModelConfig(**{"vocab_size": vocab_size, **model_overrides(config)})


def per_device(tree: Any, n: int) -> Any:
    """Shapes -> the same shapes stacked once per device, as ``pmap`` takes them."""
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), tree)


def batch_shapes(n_devices: int, rows: int, length: int) -> dict:
    """A train or eval batch's shapes: ``rows`` rows of ``length`` tokens on each of ``n_devices``."""
    import jax
    import jax.numpy as jnp

    ids = jax.ShapeDtypeStruct((n_devices, rows, length), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "labels": jax.ShapeDtypeStruct((n_devices, rows), jnp.int32),
            "weights": jax.ShapeDtypeStruct((n_devices, rows), jnp.float32)}


# How XLA:TPU words a program that does not fit: "Used 20.5G of 15.75G hbm" or "... required for HLO
# temporaries (36.52G) exceeds available HBM (15.75G)".
_OOM = (re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm"),
        re.compile(r"required for [\w ]+\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)"))


def _bytes(value: str, unit: str) -> int:
    return int(float(value) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def compile_program(kind: str, fn, args: tuple, slice_: Slice, length: int, rows: int, hlo_dir: Path | None) -> dict:
    """Lower and compile one program; -> its JSON record (``fits: false`` when XLA runs out of HBM)."""
    from flaxsst.hlo import count_kernels

    record: dict[str, Any] = {"program": kind, "topology": slice_.name, "chips": slice_.chips, "hosts": slice_.hosts,
                              "length": length, "rows_per_chip": rows}
    hbm = slice_.chip.hbm_bytes
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # XLA:TPU refuses a program that does not fit the chip's memory
        message = str(e)
        record["compile_s"] = round(time.perf_counter() - start, 1)
        match = next((m for m in (pattern.search(message) for pattern in _OOM) if m), None)
        if "vmem" in message.lower() and not match:  # a kernel's on-chip scratch, not the chip's HBM
            raise ConfigError(f"the {kind} program at {length} tokens does not compile for {slice_.name}: a kernel runs out "
                              f"of on-chip memory (VMEM); model.attention=xla keeps the attention out of the TPU kernels "
                              f"({message.strip().splitlines()[0][:200]})") from None
        if "RESOURCE_EXHAUSTED" not in message and not match:
            raise
        used = _bytes(*match.group(1, 2)) if match else None
        record["memory"] = {"total": used, "hbm": hbm, "headroom": (hbm - used) if used else None, "fits": False,
                            "available": _bytes(*match.group(3, 4)) if match else None,
                            "compiler": message.strip().splitlines()[0][:300]}
        return record
    record["compile_s"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    record["memory"] = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                        "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                        "generated_code": memory.generated_code_size_in_bytes, "total": total, "hbm": hbm,
                        "headroom": hbm - total, "fits": total <= hbm}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    compute_s, memory_s = flops / slice_.chip.bf16_flops, bytes_accessed / slice_.chip.hbm_bandwidth
    record.update(flops=flops, bytes=bytes_accessed,
                  estimate_ms=round(max(compute_s, memory_s) * 1e3, 4), bound="compute" if compute_s >= memory_s else "memory")
    text = compiled.as_text()
    kernels = count_kernels(text)
    record["kernels"] = {"total": kernels.total, **kernels.by_kind}
    record["other_instructions"] = sum(kernels.other.values())
    record["instructions"] = kernels.instructions
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        path = hlo_dir / f"{slice_.name.replace(':', '_')}-{kind}-{length}.hlo.txt"
        path.write_text(text, encoding="utf-8")
        record["hlo"] = str(path)
    return record


def compile_run(config, slice_: Slice, hlo_dir: Path | None = None, log=print) -> list[dict]:
    """The train and eval program of every length bucket of ``config``, compiled for ``slice_``."""
    import jax

    from flaxsst.evaluation import global_eval_batch
    from flaxsst.model import init_params
    from flaxsst.parallel import check_divisible
    from flaxsst.run_setup import build_steps
    from flaxsst.steps import create_train_state

    devices = topology_devices(slice_)
    n = len(devices)
    check_divisible(config.train.global_batch_size, n, f"train.global_batch_size (on the {n} chips of {slice_.name})")
    model_config = model_config_of(config)
    params = jax.eval_shape(lambda: init_params(model_config, 0))
    steps = build_steps(config, model_config, params, total_steps=10_000, devices=devices)
    state = jax.eval_shape(lambda p: create_train_state(steps.groups.pack(p), steps.optimizer, 0), params)
    lengths = sorted(set(config.data.length_buckets) | {config.data.max_seq_length})
    train_rows = config.train.global_batch_size // n
    evaluation_rows = global_eval_batch(config.train.eval_batch_size, n) // n
    records = []
    for length in lengths:
        for kind, fn, args, rows in (
                ("train", steps.train, (per_device(state, n), batch_shapes(n, train_rows, length)), train_rows),
                ("eval", steps.eval, (per_device(state.params, n), batch_shapes(n, evaluation_rows, length)), evaluation_rows)):
            log(f"compiling the {kind} program at length {length} for {slice_.name} ({n} chips, {slice_.hosts} "
                f"host{'s' if slice_.hosts > 1 else ''}) ...")
            records.append(compile_program(kind, fn, args, slice_, length, rows, hlo_dir))
    return records


def train_examples(config, given: int | None) -> tuple[int, str]:
    """The training set's size for the estimate, and where it comes from: ``--train-examples``, the
    config's synthetic set, or SST-2's train split (no data is read)."""
    if given is not None:
        return given, "--train-examples"
    if config.data.path == "synthetic":
        return config.data.synthetic_train_size, "data.synthetic_train_size"
    return SST2_TRAIN_EXAMPLES, "SST-2's train split (--train-examples sets another size)"


def recipe_estimate(records: list[dict], config, examples: tuple[int, str]) -> dict:
    """The recipe's train time from the train programs' roofline estimates: every step at the shortest
    bucket (a lower bound) and every step at the longest (an upper bound); an estimate, not a measurement."""
    steps_per_epoch = math.ceil(examples[0] / config.train.global_batch_size)
    steps = math.ceil(config.train.num_epochs * steps_per_epoch)
    if config.train.max_steps > 0:
        steps = min(steps, config.train.max_steps)
    train = [r for r in records if r["program"] == "train" and "estimate_ms" in r]
    if not train:
        return {}
    shortest, longest = min(train, key=lambda r: r["length"]), max(train, key=lambda r: r["length"])
    return {"estimate": "roofline", "train_examples": examples[0], "train_examples_from": examples[1], "steps": steps,
            "seconds_if_all_shortest": round(steps * shortest["estimate_ms"] / 1e3, 2),
            "seconds_if_all_longest": round(steps * longest["estimate_ms"] / 1e3, 2),
            "shortest_length": shortest["length"], "longest_length": longest["length"]}


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f}"


def table(records: list[dict]) -> str:
    lines = [f"{'program':<8}{'length':>7}{'rows/chip':>10}{'args GiB':>10}{'temp GiB':>10}{'total GiB':>10}"
             f"{'HBM GiB':>9}{'fits':>6}{'GFLOP':>9}{'MB':>9}{'est ms':>9}{'kernels':>9}{'compile s':>10}"]
    for r in records:
        m = r["memory"]
        lines.append(f"{r['program']:<8}{r['length']:>7}{r['rows_per_chip']:>10}{_gib(m.get('arguments')):>10}"
                     f"{_gib(m.get('temporaries')):>10}{_gib(m.get('total')):>10}{_gib(m['hbm']):>9}"
                     f"{'yes' if m['fits'] else 'NO':>6}{r.get('flops', 0) / 1e9:>9.1f}{r.get('bytes', 0) / 1e6:>9.1f}"
                     f"{r.get('estimate_ms', float('nan')):>9.3f}{r.get('kernels', {}).get('total', 0):>9}"
                     f"{r['compile_s']:>10.1f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from flaxsst.config import load_train_config
    from flaxsst.data import check_distinct_splits
    from flaxsst.paths import output_folder

    config = load_train_config(args.config, args.overrides)
    check_distinct_splits(config.data)  # the run it plans must be one train.py would start
    slice_ = parse_slice(args.topology, args.chips_per_host)
    if args.hlo is not None:
        output_folder(args.hlo, "--hlo")
    if args.train_examples is not None and args.train_examples < 1:
        raise ConfigError(f"--train-examples={args.train_examples}; expected a positive number of training examples")
    records = compile_run(config, slice_, Path(args.hlo) if args.hlo else None,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    for record in records:
        print(json.dumps(record), flush=True)
    estimate = recipe_estimate(records, config, train_examples(config, args.train_examples))
    if estimate:
        print(json.dumps({"recipe": estimate, "topology": slice_.name}), flush=True)
    print(table(records), file=sys.stderr)
    if estimate:
        print(f"recipe ({estimate['steps']} steps over {estimate['train_examples']:,} examples from "
              f"{estimate['train_examples_from']}; a roofline estimate): {estimate['seconds_if_all_shortest']:.1f} s "
              f"if every batch were {estimate['shortest_length']} tokens, {estimate['seconds_if_all_longest']:.1f} s "
              f"at {estimate['longest_length']}", file=sys.stderr)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.aot", description=cli.first_paragraph(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.strip().split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="YAML config, e.g. conf/sst2.yaml")
    p.add_argument("--topology", required=True, help="a TPU slice: v5e:2x4, v4:2x2x1, v5e-8, v4-8, v5p-8, v6e-256 ...")
    p.add_argument("--chips-per-host", type=int, help="1, 4 or 8 (default: 8 up to 8 chips of v5e/v6e, else 4)")
    p.add_argument("--hlo", metavar="DIR", help="write each compiled program's optimized HLO text here")
    p.add_argument("--train-examples", type=int,
                   help="training set size for the recipe estimate (default: the config's synthetic set, else SST-2's 67,349)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16 data.length_buckets=[64]")
    return p


def run(argv=None) -> int:
    """Compiling for a TPU on a machine without one: JAX itself runs on the CPU, and libtpu, loaded
    for the topology alone, is told enough about a TPU host to start quietly."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
