"""Reading a compiled XLA program (``compiled.as_text()``): how many kernels one call launches.

A kernel is an instruction of the ENTRY computation that launches work on the device: a fusion, a
custom call, a collective (its ``-start`` half for async ones), a copy, or an unfused dot or
convolution. Other unfused instructions are counted apart, as ``other``: on a TPU mostly the scalar
unit's arithmetic (the learning-rate schedule, dropout keys) and ``copy-start``/``slice-start``, the
asynchronous copies into on-chip memory that XLA schedules to overlap the kernels, with the
``ConcatBitcast`` custom call that joins a sliced copy's pieces (already contiguous in memory: XLA's
memory-space assignment names it a bitcast, no work). Bookkeeping launches nothing: parameters,
constants, tuples and their elements, bitcasts, the ``-done`` halves of async pairs. A ``while``
loop's body counts once per trip (``known_trip_count`` in its backend config, or a condition
``counter < N``; a loop without either counts once and is flagged), a ``call`` counts its callee, a
``conditional`` its largest branch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

NO_WORK = {
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "add-dependency",
    "opt-barrier", "partition-id", "replica-id", "domain", "get-dimension-size", "set-dimension-size",
}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all"}
# The kind each counted opcode is reported under.
KINDS = {"fusion": "fusion", "custom-call": "custom-call", "copy": "copy", "dot": "dot", "convolution": "dot",
         "send": "send/recv", "recv": "send/recv"}

# Custom calls that launch nothing: the view XLA's memory-space assignment makes of a sliced prefetch.
NOT_KERNELS = {"ConcatBitcast"}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class KernelCount:
    """Kernels launched by one call of a program, by kind, and the loops that were unrolled to count them."""

    total: int
    by_kind: dict[str, int]  # fusion, custom-call, collective, copy, dot
    other: dict[str, int]  # unfused instructions that are not kernels, by opcode
    loops: list[dict]  # {"body": name, "trips": n or None}
    instructions: int  # every instruction in the ENTRY computation, kernels or not


def _opcode(rest: str) -> tuple[str, str]:
    """``f32[2]{0} add(%a, %b), ...`` -> (``add``, the text after the opcode)."""
    depth, i = 0, 0
    if rest.startswith("("):  # a tuple type: skip to its matching parenthesis
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        rest = rest[i + 1:]
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else rest
    match = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
    return (match.group(1), rest[match.end():]) if match else ("", rest)


def parse_computations(text: str) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """The ENTRY computation's name and every computation's ``(opcode, operands and attributes)`` list."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            computations[current].append(_opcode(instruction.group(2)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, computations


def _attribute(text: str, name: str) -> str | None:
    """``name=value`` of an instruction: a computation (``%body``) or a quoted string (``"ConcatBitcast"``)."""
    match = re.search(rf'\b{name}="?%?([\w.\-]+)', text)
    return match.group(1) if match else None


def _trip_count(text: str, condition: list[tuple[str, str]]) -> int | None:
    """From the loop's backend config, or from a condition ``counter < N`` with one integer constant
    (how JAX lowers ``scan`` and ``fori_loop``: the counter starts at 0 and steps by 1)."""
    match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', text)
    if match:
        return int(match.group(1))
    constants = [int(m.group(1)) for op, rest in condition if op == "constant" for m in [re.match(r"(\d+)\)", rest)] if m]
    compares = [rest for op, rest in condition if op == "compare"]
    if len(constants) == 1 and len(compares) == 1 and "direction=LT" in compares[0]:
        return constants[0]
    return None


def count_kernels(text: str) -> KernelCount:
    """The kernels one call of the compiled program in ``text`` launches (see the module docstring)."""
    entry, computations = parse_computations(text)
    loops: list[dict] = []

    def count(name: str, multiplier: int, kinds: Counter) -> None:
        for opcode, rest in computations.get(name, []):
            if opcode in NO_WORK or opcode.endswith("-done"):
                continue
            if opcode == "while":
                body = _attribute(rest, "body")
                trips = _trip_count(rest, computations.get(_attribute(rest, "condition"), []))
                loops.append({"body": body, "trips": trips})
                count(body, multiplier * (trips or 1), kinds)
            elif opcode == "call":
                count(_attribute(rest, "to_apply"), multiplier, kinds)
            elif opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", rest.split("branch_computations=", 1)[-1].split("}", 1)[0]) \
                    if "branch_computations" in rest else \
                    [_attribute(rest, "true_computation"), _attribute(rest, "false_computation")]
                best: Counter = Counter()
                for branch in branches:
                    trial: Counter = Counter()
                    count(branch, multiplier, trial)
                    if sum(trial.values()) > sum(best.values()):
                        best = trial
                kinds.update(best)
            elif opcode == "custom-call" and (target := _attribute(rest, "custom_call_target")) in NOT_KERNELS:
                kinds[f"other:{target}"] += multiplier
            else:
                base = opcode.removesuffix("-start")
                kind = KINDS.get(opcode) or ("collective" if base in COLLECTIVES else f"other:{opcode}")
                kinds[kind] += multiplier

    kinds: Counter = Counter()
    count(entry, 1, kinds)
    other = {k.split(":", 1)[1]: n for k, n in kinds.items() if k.startswith("other:")}
    kernels = {k: n for k, n in kinds.items() if not k.startswith("other:")}
    return KernelCount(total=sum(kernels.values()), by_kind=dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
                       other=dict(sorted(other.items(), key=lambda kv: -kv[1])), loops=loops,
                       instructions=len(computations[entry]))


def summary(count: KernelCount) -> str:
    """``378 kernels (fusion 341, copy 34, collective 3)``."""
    parts = ", ".join(f"{kind} {n}" for kind, n in count.by_kind.items())
    if count.other:
        parts += f"; other instructions {sum(count.other.values())}"
    loops = "".join(f"; loop {loop['body']} x{loop['trips'] or '? (trip count unknown)'}" for loop in count.loops)
    return f"{count.total} kernels ({parts}){loops}"


def to_json(count: KernelCount) -> str:
    return json.dumps(dataclasses.asdict(count))
