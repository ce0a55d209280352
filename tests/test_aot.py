"""Compiling the trainer's own steps for TPU slices on this CPU (libtpu, the ``tpu`` extra), the kernel
counter on a program whose kernels are known, and a quiet start with libtpu installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from flaxsst.aot import SST2_TRAIN_EXAMPLES, compile_run, parse_slice, recipe_estimate, train_examples
from flaxsst.config import load_train_config
from flaxsst.errors import ConfigError
from flaxsst.hlo import count_kernels
from tests.commands import assert_one_line_error, command_env, run

CONF = Path(__file__).resolve().parents[1] / "conf"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]'")

# Known kernels: fusion, custom-call, copy, all-reduce-start, dot at the top (5); a loop of 6 trips
# whose body launches a fusion and an all-reduce (12); a call whose callee launches a fusion (1): 18.
# Not kernels: parameters, constants, tuples, get-tuple-element, bitcast, the -done halves; counted
# apart as "other": the asynchronous copy-start and the loop counter's scalar add (6 per run of the loop).
HAND_BUILT = """HloModule hand_built, entry_computation_layout={(f32[8]{0}, f32[8]{0})->(f32[], f32[8]{0})}

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add = f32[8]{0} add(f32[8]{0} %p0, f32[8]{0} %p1)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (state: (s32[], f32[8])) -> (s32[], f32[8]) {
  %state = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[8]{0} get-tuple-element(%state), index=1
  %y = f32[8]{0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  %r = f32[8]{0} all-reduce(%y), replica_groups={}, to_apply=%sum
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[8]{0}) tuple(%next, %r)
}

%cond (state.1: (s32[], f32[8])) -> pred[] {
  %state.1 = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%state.1), index=0
  %six = s32[] constant(6)
  ROOT %lt = pred[] compare(%j, %six), direction=LT
}

%callee (c: f32[8]) -> f32[8] {
  %c = f32[8]{0} parameter(0)
  ROOT %f2 = f32[8]{0} fusion(%c, %c), kind=kLoop, calls=%fused_add
}

ENTRY %main (a.1: f32[8], b.1: f32[8]) -> (f32[], f32[8]) {
  %a.1 = f32[8]{0} parameter(0)
  %b.1 = f32[8]{0} parameter(1)
  %f = f32[8]{0} fusion(%a.1, %b.1), kind=kLoop, calls=%fused_add
  %cc = f32[8]{0} custom-call(%f), custom_call_target="Sharding"
  %cs = (f32[8]{0}, f32[8]{0}, u32[]) copy-start(%cc)
  %cd = f32[8]{0} copy-done(%cs)
  %cp = f32[8]{0:T(128)} copy(%cd)
  %ars = f32[8]{0} all-reduce-start(%cp), replica_groups={}, to_apply=%sum
  %ard = f32[8]{0} all-reduce-done(%ars)
  %bc = f32[8]{0} bitcast(%ard)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %bc)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %res = f32[8]{0} get-tuple-element(%w), index=1
  %called = f32[8]{0} call(%res), to_apply=%callee
  %d = f32[] dot(%called, %b.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %t = (f32[], f32[8]{0}) tuple(%d, %res)
}
"""


def test_the_kernel_counter_counts_a_hand_built_program_it_knows():
    count = count_kernels(HAND_BUILT)
    assert count.by_kind == {"fusion": 8, "collective": 7, "custom-call": 1, "copy": 1, "dot": 1}
    assert count.total == 18
    assert count.other == {"add": 6, "copy-start": 1}
    assert count.loops == [{"body": "body", "trips": 6}]
    assert count.instructions == 17


SLICED_PREFETCH = """HloModule sliced, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%fused_neg (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0} parameter(0)
  ROOT %n = f32[8,128]{1,0} negate(%p)
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %s0 = ((f32[8,128]{1,0}), f32[4,128]{1,0:S(1)}, s32[]) slice-start(%a), slice={[0:4], [0:128]}
  %s1 = ((f32[8,128]{1,0}), f32[4,128]{1,0:S(1)}, s32[]) slice-start(%a), slice={[4:8], [0:128]}
  %d0 = f32[4,128]{1,0:S(1)} slice-done(%s0)
  %d1 = f32[4,128]{1,0:S(1)} slice-done(%s1)
  %joined = f32[8,128]{1,0:S(1)} custom-call(%d0, %d1), custom_call_target="ConcatBitcast"
  ROOT %f = f32[8,128]{1,0} fusion(%joined), kind=kLoop, calls=%fused_neg
}
"""


def test_a_sliced_prefetch_into_on_chip_memory_is_no_kernel():
    # XLA's memory-space assignment copies a buffer into on-chip memory in slices and joins them
    # with a ConcatBitcast custom call, a view of memory already in place: one kernel here, the fusion.
    count = count_kernels(SLICED_PREFETCH)
    assert count.by_kind == {"fusion": 1} and count.total == 1
    assert count.other == {"slice-start": 2, "ConcatBitcast": 1}


def test_a_loop_trip_count_comes_from_its_condition_or_the_loop_counts_once_flagged():
    without_config = HAND_BUILT.replace(', backend_config={"known_trip_count":{"n":"6"}}', "")
    assert count_kernels(without_config).total == 18  # the condition: counter < 6
    unknown = without_config.replace("direction=LT", "direction=NE")
    count = count_kernels(unknown)
    assert count.total == 8 and count.loops == [{"body": "body", "trips": None}]


@pytest.mark.parametrize("name,shape,chips,hosts", [
    ("v5e:2x2", (2, 2), 4, 1), ("v5e-8", (2, 4), 8, 1), ("v5e:16x16", (16, 16), 256, 64),
    ("v4-8", (2, 2, 1), 4, 1), ("v5p-8", (2, 2, 1), 4, 1), ("v6e-8", (2, 4), 8, 1), ("v6e-256", (16, 16), 256, 64),
    ("v5litepod-8", (2, 4), 8, 1), ("V5E-8", (2, 4), 8, 1),  # gcloud's name for v5e; any case
])
def test_slice_names_give_their_chips_and_hosts(name, shape, chips, hosts):
    slice_ = parse_slice(name)
    assert (slice_.shape, slice_.chips, slice_.hosts) == (shape, chips, hosts)


def test_an_unknown_slice_is_one_line_listing_the_forms():
    with pytest.raises(ConfigError, match=r"--topology v9x:2x2: unknown TPU slice; expected GEN:AxB .* v4, v5e, v5p, v6e"):
        parse_slice("v9x:2x2")
    with pytest.raises(ConfigError, match="v4 slices have 3 dimensions"):
        parse_slice("v4:2x2")
    with pytest.raises(ConfigError, match="--topology V9-8: unknown TPU slice"):  # named as given
        parse_slice("V9-8")


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
    from flaxsst import aot

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
        aot.topology_devices(parse_slice("v5e:2x2"))


def _tiny(*overrides):
    return load_train_config(CONF / "tiny.yaml", ["model.tokenizer=", *overrides])


def _state_bytes(config) -> int:
    """Parameters plus both AdamW moments, float32, worked out from the config's shapes by hand."""
    m = config.model.config  # tiny.yaml's shape; positions: DistilBERT's 512
    vocab, dim, hidden, layers, positions = 30522, m["dim"], m["hidden_dim"], m["n_layers"], 512
    per_layer = 4 * (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim) + 2 * dim
    params = vocab * dim + positions * dim + 2 * dim + layers * per_layer + (dim * dim + dim) + (dim * 2 + 2)
    return 3 * 4 * params


@needs_libtpu
def test_tiny_steps_compile_for_v5e_2x2_through_the_trainers_own_step_builders():
    config = _tiny()
    records = compile_run(config, parse_slice("v5e:2x2"), log=lambda line: None)
    assert [(r["program"], r["length"]) for r in records] == [("train", 16), ("eval", 16), ("train", 32), ("eval", 32)]
    for record in records:
        assert record["memory"]["fits"] and record["kernels"]["total"] > 0 and record["flops"] > 0
        assert record["chips"] == 4 and record["hosts"] == 1
    train = records[0]
    assert train["rows_per_chip"] == 8 and train["kernels"]["collective"] >= 1  # the gradients' all-reduce
    assert train["memory"]["arguments"] >= _state_bytes(config)  # the replicated state, on every chip
    examples = train_examples(config, None)  # tiny.yaml trains on its 2,000 synthetic rows for 4 epochs
    assert examples == (2000, "data.synthetic_train_size")
    estimate = recipe_estimate(records, config, examples)
    assert estimate["steps"] == math.ceil(2000 / 32) * 4 == 252 and estimate["seconds_if_all_shortest"] > 0
    assert recipe_estimate(records, _tiny("train.max_steps=40"), examples)["steps"] == 40


def test_the_recipe_estimate_counts_the_configs_data_or_says_it_assumes_sst2():
    assert train_examples(_tiny(), 500) == (500, "--train-examples")
    size, source = train_examples(_tiny("data.path=glue/sst2"), None)
    assert size == SST2_TRAIN_EXAMPLES == 67349 and "SST-2" in source and "--train-examples" in source


@needs_libtpu
def test_tiny_steps_compile_for_a_two_host_slice():
    records = compile_run(_tiny("data.length_buckets=[32]"), parse_slice("v5e:2x4", chips_per_host=4), log=lambda line: None)
    assert {(r["program"], r["chips"], r["hosts"], r["rows_per_chip"]) for r in records} == {
        ("train", 8, 2, 4), ("eval", 8, 2, 16)}
    assert all(r["memory"]["fits"] for r in records)


@needs_libtpu
def test_a_config_that_cannot_fit_reports_fits_false_with_its_figures():
    config = _tiny("model.config.dim=4096", "model.config.n_heads=32", "model.config.hidden_dim=131072", "data.length_buckets=[32]")
    (train,) = [r for r in compile_run(config, parse_slice("v5e:2x2"), log=lambda line: None) if r["program"] == "train"]
    assert train["memory"]["fits"] is False
    assert train["memory"]["total"] > train["memory"]["hbm"] == 16 * 2**30


@needs_libtpu
def test_the_command_prints_json_per_program_and_a_table_and_libtpu_stays_quiet(tmp_path):
    result = run(["-m", "flaxsst.aot", "--config", "conf/tiny.yaml", "--topology", "v5e:2x2", "--hlo", str(tmp_path),
                  "model.tokenizer=", "data.length_buckets=[32]"], command_env(JAX_PLATFORMS=""))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("program") for r in records] == ["train", "eval", None] and "recipe" in records[-1]
    assert Path(records[0]["hlo"]).read_text().startswith("HloModule")
    assert "fits" in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr
    assert "Failed to find host bounds" not in result.stderr
    bad = run(["-m", "flaxsst.aot", "--config", "conf/tiny.yaml", "--topology", "v5e:3x3"], command_env(JAX_PLATFORMS=""))
    assert_one_line_error(bad, "--topology v5e:3x3: not a v5e slice; its shapes are 1x1, 2x2, 2x4")


@needs_libtpu
def test_product_commands_start_quietly_with_libtpu_installed(tiny_model_dir):
    result = run(["-m", "flaxsst.predict", "--model", str(tiny_model_dir)], command_env(JAX_PLATFORMS=""), stdin="fine\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_libtpu
def test_a_machine_without_tpu_chips_starts_without_loading_libtpu():
    """With the tpu extra on a CPU-only machine the product does not load libtpu (its load is ~0.4 s
    of every start), and a TPU topology still loads it for flaxsst.aot."""
    probe = ("import flaxsst, jax; jax.devices(); loaded = lambda: any('libtpu' in line for line in open('/proc/self/maps'));"
             "print(loaded()); from jax.experimental import topologies;"
             "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2'); print(loaded())")
    result = run(["-c", probe], command_env(JAX_PLATFORMS=""))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
    assert result.stderr == ""
