"""How ``Classifier`` cuts encoded texts into batches: close to the shapes the texts need, from a
fixed set of shapes so that repeated calls reuse a few compiled programs.

On a CPU the work grows with every padded token and every padding row, and a compile takes
~0.5 s, so a batch takes the shortest of ``octave_steps`` lengths that holds its longest text (every
length up to 16, then steps of 2 to 32, 4 to 64, 8 to 128: a text pads by less than 1/8 of its own
length) and holds as many texts as it has rows: 24, or a power of two below. The sorted texts are cut
every 24 (the fewest shapes, so the fewest compiles), or, once every shape is compiled (a server after
its warm-up), where the work is least: padded tokens, attention's share that grows with the length,
and a call's fixed cost (``CPU_CALL_TOKENS``). A server's batch of texts drawn at random pads far
more than a sorted corpus when cut every 24 texts (bench/RESULTS.md). On an accelerator, where a
launch costs more than a padded row, batches of ``batch_size`` pad to powers of two.

``BatchShapes.pack`` puts several texts in a row instead (each attends only to its own tokens: the
model's ``cls_positions``): the same shapes, a server's batch of 69 SST-2 sentences padded 1.05x
instead of 1.14x, in 3 calls instead of 9.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flaxsst.data import pick_length
from flaxsst.errors import ConfigError

CPU_BATCH_SIZE = 24
CPU_STEPS_PER_OCTAVE = 8
ACCELERATOR_BATCH_SIZE = 128
ACCELERATOR_SMALLEST_LENGTH = 16
# The cost of a CPU batch in padded tokens, fitted on DistilBERT-base fp32, 2 cores, over 1-24 rows of 16-128
# tokens (bench/RESULTS.md, 2026-12-07): 6.1 ms a call + 0.26 ms a token + 0.00013 ms a token per token of
# length (attention), within 11% of each measured shape.
CPU_CALL_TOKENS = 24.0
CPU_ATTENTION_PER_LENGTH = 0.0005
# int8's dense layers take a quarter of float32's time, its attention the same: 1.7 ms a call + 0.076 ms a
# token + 0.00025 ms a token per token of length (bench/RESULTS.md, 2026-12-07).
CPU_INT8_ATTENTION_PER_LENGTH = 0.003
# A packed row of ``length`` tokens holds at most ``length // PACKED_TOKENS_PER_SLOT`` texts: the last block
# runs one query row per slot, used or not.
PACKED_TOKENS_PER_SLOT = 8


def powers_of_two(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``largest``, and ``largest`` itself."""
    lengths = []
    length = smallest
    while length < largest:
        lengths.append(length)
        length *= 2
    return (*lengths, largest)


def octave_steps(per_octave: int, largest: int) -> tuple[int, ...]:
    """Lengths from 2 below ``largest``, and ``largest`` itself, each octave ``[p, 2p)`` in steps of
    ``p / per_octave`` (at least 1): a length ``n`` pads to less than ``n * (1 + 1 / per_octave)``.
    ``octave_steps(8, 40)`` is ``2, 3, ..., 16, 18, ..., 30, 32, 36, 40``."""
    lengths = []
    length = 2
    while length < largest:
        lengths.append(length)
        length += max(1, (1 << (length.bit_length() - 1)) // per_octave)
    return (*lengths, largest)


def serving_lengths(backend: str, max_length: int) -> tuple[int, ...]:
    """The padded lengths a server warms: on a CPU 10 up to 128 tokens (every 4 from 16 to 32, then 40,
    48, 64, 96, 128; 60 programs instead of the 234 of ``octave_steps``), each compiled program holding
    ~10 MB and taking ~1 s to compile on 2 cores, for 6-7% more padded tokens on SST-2 sentences
    (bench/RESULTS.md); past 128, powers of two and their midpoints. An accelerator's powers of two are
    few already."""
    if backend != "cpu":
        return powers_of_two(min(ACCELERATOR_SMALLEST_LENGTH, max_length), max_length)
    steps = [16, 20, 24, 28, 32, 40, 48, 64, 96, 128]
    while steps[-1] < max_length:
        steps += [steps[-1] * 3 // 2, steps[-1] * 2]
    return (*[length for length in steps if length < max_length], max_length)


def multiples(step: int, largest: int) -> tuple[int, ...]:
    """Multiples of ``step`` below ``largest``, and ``largest`` itself."""
    return (*range(step, largest, step), largest)


@dataclasses.dataclass(frozen=True)
class Batch:
    """``indices`` of the inputs in this batch, padded to ``rows`` x ``length`` tokens."""

    indices: np.ndarray
    rows: int
    length: int

    def take(self, logits: np.ndarray) -> np.ndarray:
        """The logits of ``indices``, in their order, from the batch's ``[rows, labels]``."""
        return logits[: len(self.indices)]


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """``indices`` of the inputs in this batch, packed in ``rows`` x ``length`` tokens: input ``indices[i]``
    fills ``row[i]`` from ``start[i]``, its row's ``slot[i]``-th text (``slots(length)`` at most)."""

    indices: np.ndarray
    rows: int
    length: int
    row: np.ndarray
    start: np.ndarray
    slot: np.ndarray

    def take(self, logits: np.ndarray) -> np.ndarray:
        """The logits of ``indices``, in their order, from the batch's ``[rows, slots, labels]``."""
        return logits[self.row, self.slot]

    def arrays(self, ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, ...]:
        """The model's inputs for texts of token ``ids`` (``ids[i]`` for each of ``indices``): ``input_ids``,
        each token's text number in its row (0: padding), its position in its text ``[rows, length]``, and
        where each row's texts start ``[rows, slots]``."""
        shape = (self.rows, self.length)
        input_ids = np.full(shape, pad_id, np.int32)
        texts, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        cls_positions = np.zeros((self.rows, slots(self.length)), np.int32)
        for index, row, start, slot in zip(self.indices, self.row, self.start, self.slot):
            seq = ids[index]
            input_ids[row, start : start + len(seq)] = seq
            texts[row, start : start + len(seq)] = slot + 1
            positions[row, start : start + len(seq)] = np.arange(len(seq))
            cls_positions[row, slot] = start
        return input_ids, texts, positions, cls_positions


def slots(length: int) -> int:
    """How many texts a packed row of ``length`` tokens holds at most."""
    return max(1, length // PACKED_TOKENS_PER_SLOT)


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    """The shapes batches take: at most ``batch_size`` rows, one of ``lengths`` tokens (ascending; the
    last is the longest a text is cut to). ``split_rows``: every batch holds as many texts as it has
    rows (``batch_size``, or a power of two below it); otherwise a short last batch pads its rows to a
    power of two."""

    batch_size: int
    lengths: tuple[int, ...]
    split_rows: bool
    attention_per_length: float = CPU_ATTENTION_PER_LENGTH  # the cost model's (int8: CPU_INT8_ATTENTION_PER_LENGTH)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")

    @classmethod
    def for_backend(cls, backend: str, max_length: int, batch_size: int | None = None,
                    length_step: int | None = None, lengths: Sequence[int] | None = None) -> "BatchShapes":
        """The defaults for ``backend`` ("cpu", "gpu", "tpu"); ``batch_size``, ``length_step`` (padded
        lengths are its multiples instead) and ``lengths`` (these, cut at ``max_length``, and
        ``max_length`` itself) replace them."""
        if length_step is not None and length_step < 1:
            raise ConfigError(f"length_step={length_step} must be at least 1")
        if length_step and lengths is not None:
            raise ConfigError("length_step and lengths both set the padded lengths: give one")
        cpu = backend == "cpu"
        if lengths is not None:
            lengths = sorted(set(lengths))
            if not lengths or lengths[0] < 1 or lengths[-1] > max_length:
                raise ConfigError(f"lengths={lengths}: expected padded lengths from 1 to max_length={max_length}")
            lengths = (*[length for length in lengths if length < max_length], max_length)
        elif length_step:
            lengths = multiples(length_step, max_length)
        elif cpu:
            lengths = octave_steps(CPU_STEPS_PER_OCTAVE, max_length)
        else:
            lengths = powers_of_two(min(ACCELERATOR_SMALLEST_LENGTH, max_length), max_length)
        rows = (CPU_BATCH_SIZE if cpu else ACCELERATOR_BATCH_SIZE) if batch_size is None else batch_size
        return cls(rows, lengths, cpu)

    def row_counts(self) -> list[int]:
        """Every row count a batch can have."""
        powers = [1 << k for k in range(self.batch_size.bit_length()) if 1 << k < self.batch_size]
        return powers + [self.batch_size]

    def programs(self) -> list[tuple[int, int]]:
        """Every ``(rows, length)`` a batch can take: the programs a model compiles for them."""
        return [(rows, length) for length in self.lengths for rows in self.row_counts()]

    def padded_length(self, longest: int) -> int:
        """The shortest of ``lengths`` that holds ``longest`` tokens."""
        if longest > self.lengths[-1]:
            raise ValueError(f"a text of {longest} tokens is longer than the longest batch ({self.lengths[-1]})")
        return pick_length(longest, self.lengths, self.lengths[-1])

    def plan(self, lengths: Sequence[int], least_cost: bool = False) -> list[Batch]:
        """Batches for texts of ``lengths`` tokens: sorted by length (stable), each padded to its own
        longest text's shortest fitting length, cut every ``batch_size`` texts. On a CPU (``split_rows``)
        a short last batch runs as power-of-two parts with no padding rows, and ``least_cost`` (for a
        ``Classifier`` whose every shape is compiled) cuts instead where the work is least
        (``least_cost_cuts``); elsewhere a short last batch pads its rows to a power of two."""
        lengths = np.asarray(lengths, dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        if self.split_rows and least_cost:
            padded = [self.padded_length(int(length)) for length in lengths[order]]
            return [Batch(order[start:end], end - start, padded[end - 1])
                    for start, end in least_cost_cuts(padded, self.row_counts(), self.attention_per_length)]
        batches = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for texts, rows in self._parts(len(chunk)):
                part, chunk = chunk[:texts], chunk[texts:]
                batches.append(Batch(part, rows, self.padded_length(int(lengths[part].max()))))
        return batches

    def pack(self, lengths: Sequence[int]) -> list[PackedBatch]:
        """Batches for texts of ``lengths`` tokens, several texts to a row (``packing_groups``): the texts of a
        group fill rows of its longest text's padded length, first fit from the longest, and its rows are
        cut into batches of ``row_counts``, the largest first."""
        lengths = np.asarray(lengths, dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        padded = [self.padded_length(int(length)) for length in lengths[order]]
        batches, counts = [], self.row_counts()
        for start, end in packing_groups(lengths[order], padded, counts, self.attention_per_length):
            length = padded[end - 1]
            rows = first_fit_rows(lengths[order[start:end]], length, slots(length))
            for count in largest_first(len(rows), counts):
                part, rows = rows[:count], rows[count:]
                texts = [(index, row, offset, slot) for row, placed in enumerate(part)
                         for slot, (index, offset) in enumerate(placed)]
                index, row, offset, slot = (np.asarray(column, dtype=np.int64) for column in zip(*texts))
                batches.append(PackedBatch(order[start + index], count, length, row, offset, slot))
        return batches

    def _parts(self, count: int) -> list[tuple[int, int]]:
        """``(texts, rows)`` of the batches ``count`` sorted texts (at most ``batch_size``) run as."""
        if count == self.batch_size:
            return [(count, count)]
        if not self.split_rows:
            return [(count, min(1 << (count - 1).bit_length(), self.batch_size))]
        return [(rows, rows) for rows in largest_first(count, self.row_counts())]


def largest_first(count: int, sizes: Sequence[int]) -> list[int]:
    """``count`` cut into parts of ``sizes`` (one of them 1), each the largest that fits what is left."""
    parts = []
    for size in sorted(sizes, reverse=True):
        parts += [size] * (count // size)
        count %= size
    return parts


def least_cost_cuts(padded: Sequence[int], row_counts: Sequence[int],
                    attention_per_length: float = CPU_ATTENTION_PER_LENGTH) -> list[tuple[int, int]]:
    """``(start, end)`` runs of the ascending ``padded`` lengths, each of one of ``row_counts`` texts, that
    cover them at the least cost: a run costs its rows x its last length x (1 + ``attention_per_length`` x
    that length), plus ``CPU_CALL_TOKENS``. Dynamic programming over the run ends, O(len x row counts)."""
    best, take = [0.0] + [float("inf")] * len(padded), [0] * (len(padded) + 1)
    for end in range(1, len(padded) + 1):
        length = padded[end - 1]
        per_row = length * (1 + attention_per_length * length)
        for rows in row_counts:
            if rows > end:
                break
            cost = best[end - rows] + rows * per_row + CPU_CALL_TOKENS
            if cost < best[end]:
                best[end], take[end] = cost, rows
    cuts, end = [], len(padded)
    while end:
        cuts.append((end - take[end], end))
        end -= take[end]
    return cuts[::-1]


def packing_cost(tokens: int, count: int, longest_halves: int, length: int, row_counts: Sequence[int],
                 attention_per_length: float = CPU_ATTENTION_PER_LENGTH) -> float:
    """The estimated cost (``least_cost_cuts``' units) of packing ``count`` texts of ``tokens`` in all, of
    which ``longest_halves`` are longer than half of ``length``, into rows of ``length`` tokens."""
    rows = max(-(-tokens // length), longest_halves, -(-count // slots(length)))
    calls = len(largest_first(rows, row_counts))
    return rows * length * (1 + attention_per_length * length) + calls * CPU_CALL_TOKENS


def packing_groups(lengths: Sequence[int], padded: Sequence[int], row_counts: Sequence[int],
                   attention_per_length: float = CPU_ATTENTION_PER_LENGTH) -> list[tuple[int, int]]:
    """``(start, end)`` runs of the ascending ``lengths`` (``padded``: each one's padded length), each packed
    into rows of its last text's padded length, that cover them at the least estimated cost
    (``packing_cost``). Runs end where the padded length changes: dynamic programming over those ends."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = [end for end in range(1, len(padded) + 1) if end == len(padded) or padded[end] != padded[end - 1]]
    tokens = np.concatenate([[0], np.cumsum(lengths)])
    best, take = {0: 0.0}, {}
    for end in ends:
        length = padded[end - 1]
        above_half = int(np.searchsorted(lengths[:end], length // 2, side="right"))
        for start in [0, *[e for e in ends if e < end]]:
            halves = end - max(start, above_half)
            cost = best[start] + packing_cost(int(tokens[end] - tokens[start]), end - start, halves, length,
                                              row_counts, attention_per_length)
            if end not in best or cost < best[end]:
                best[end], take[end] = cost, start
    runs, end = [], len(padded)
    while end:
        runs.append((take[end], end))
        end = take[end]
    return runs[::-1]


def first_fit_rows(lengths: Sequence[int], length: int, most: int) -> list[list[tuple[int, int]]]:
    """Texts of ``lengths`` tokens (each at most ``length``) placed in rows of ``length`` tokens holding at
    most ``most`` texts, the longest first, each in the first row with room: every row's
    ``(index into lengths, start)`` pairs."""
    rows: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for index in np.argsort(-np.asarray(lengths), kind="stable"):
        need = int(lengths[index])
        for row, room in enumerate(free):
            if room >= need and len(rows[row]) < most:
                rows[row].append((int(index), length - room))
                free[row] -= need
                break
        else:
            rows.append([(int(index), 0)])
            free.append(length - need)
    return rows
