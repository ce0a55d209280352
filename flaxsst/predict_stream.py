"""The prediction command line's input and output: one text per line streams, JSON is read whole.

One text per line (a file or a pipe) is read in chunks of a few batches, so memory stays flat
whatever the input's size: each chunk's answers are written, as JSON lines by default, as soon as
its batches finish, and a chunk is cut early when the input pauses (a person typing, a slow
producer), so every line is answered without waiting for the input to close. A request that starts
with ``{`` or ``[`` is JSON (``{"input_data": [...]}`` or a list) and is answered with a JSON list.
Progress goes to stderr: a bar on a terminal, else a line every few seconds; its ETA is the pace of
the chunks finished so far, which come in input order.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterator

from flaxsst.classifier import Classifier, validate_texts
from flaxsst.errors import DataError, not_utf8
from flaxsst.metric_log import duration, terminal_columns

PAUSE_SECONDS = 0.05  # an input quiet this long ends the chunk being gathered
LOG_EVERY_SECONDS = 5.0  # progress lines without a terminal
FORMATS = ("auto", "jsonl", "json")


class Progress:
    """Lines answered so far, on stderr: a tqdm bar on a terminal that has columns, else a line every
    ``every`` seconds and one at the end (a job shorter than ``every`` stays quiet). The ETA is the
    pace since the first chunk finished (the first one also compiles), times the lines left."""

    def __init__(self, total: int | None, stream: IO | None = None, every: float = LOG_EVERY_SECONDS,
                 clock=time.monotonic):
        self.total, self.stream, self.every, self.clock = total, stream or sys.stderr, every, clock
        self.done = 0
        self.began = self.last_line = clock()
        self.first: tuple[float, int] | None = None  # (time, lines) when the first chunk finished
        self.bar = None
        self.printed = False
        if terminal_columns(self.stream) > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="predict", unit="line", file=self.stream, dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left at the pace since the first chunk; None without a total or a second chunk."""
        if self.total is None or self.first is None or self.done <= self.first[1]:
            return None
        pace = (self.clock() - self.first[0]) / (self.done - self.first[1])
        return pace * max(self.total - self.done, 0)

    def update(self, lines: int) -> None:
        if self.first is None:
            self.first = (self.clock(), lines)
            if self.bar is not None:
                self.bar.unpause()  # the bar's rate starts after the first chunk's compile
        self.done += lines
        if self.bar is not None:
            self.bar.update(lines)
            return
        now = self.clock()
        if now - self.last_line >= self.every:
            self.last_line = now
            self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = self.clock() - self.began
        rate = self.done / max(elapsed, 1e-9)
        rate_text = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
        of = f"/{self.total} ({self.done / self.total:.0%})" if self.total else ""
        eta = self.eta()
        tail = "" if final or eta is None else f"  ETA {duration(eta)}"
        word = "predicted" if final else "predict:"
        print(f"{word} {self.done}{of} lines  {rate_text} lines/s  elapsed {duration(elapsed)}{tail}",
              file=self.stream, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed:
            self._line(final=True)


def check_output_file(path: str) -> None:
    """``--output`` names a file in a folder that exists (checked before the model loads)."""
    target = Path(path)
    if target.is_dir():
        raise DataError(f"--output {path} is a folder; name a file")
    if not target.parent.is_dir():
        raise DataError(f"--output {path}: the folder {target.parent} does not exist")


class Answers:
    """Where answers go: ``stdout``, or ``path`` written atomically (a temporary file beside it that
    replaces it once every answer is written; on an error the old file stays). ``jsonl``: one JSON
    object per line; ``json``: one JSON list, written as it grows."""

    def __init__(self, form: str, path: str | None = None, stdout: IO | None = None):
        self.form, self.count = form, 0
        self.path = Path(path) if path else None
        if self.path is None:
            self.file, self.tmp = stdout or sys.stdout, None
            return
        check_output_file(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.file = open(self.tmp, "w", encoding="utf-8")
        except OSError as e:
            raise DataError(f"--output {path}: cannot be written ({e.strerror or e})") from None

    def write(self, predictions: list[dict[str, Any]]) -> None:
        parts = []
        for prediction in predictions:
            text = json.dumps(prediction)
            if self.form == "jsonl":
                parts.append(text + "\n")
            else:
                parts.append(("[" if self.count == 0 else ", ") + text)
            self.count += 1
        self.file.write("".join(parts))
        self.file.flush()

    def finish(self) -> None:
        if self.form == "json":
            self.file.write("[]\n" if self.count == 0 else "]\n")
        self.file.flush()
        if self.tmp is not None:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        if self.tmp is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


def count_lines(path: str) -> int:
    """Lines of a file (a last line without a newline counts), read in blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def read_request(raw: str, source: str = "stdin") -> list[str]:
    """JSON ``{"input_data": [...]}`` (the model card's endpoint format), a JSON list of texts, or
    one text per line. A bad request is a ``DataError`` naming ``source``."""
    stripped = raw.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            request = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} starts with {stripped[0]!r} but is not valid JSON: {e}") from None
        except RecursionError:  # Python's decoder recurses once per nested list or object
            raise DataError(f"{source}: JSON nested too deeply to read (a list of texts needs two levels)") from None
        if isinstance(request, dict):
            if "input_data" not in request:
                raise DataError(f'{source}: a JSON object must be {{"input_data": [...]}}; got keys {sorted(request)}')
            request = request["input_data"]
    else:
        request = raw.splitlines()
    try:
        return validate_texts(request)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: {e}") from None


def _read_lines(stream: IO[bytes], slots: queue.Queue) -> None:
    """Put each raw line of ``stream`` on ``slots`` (blocking while it is full), then None."""
    try:
        for raw in stream:
            slots.put(raw)
        slots.put(None)
    except BaseException as e:  # surfaced in the consumer
        slots.put(e)


def line_chunks(stream: IO[bytes], first: list[bytes], chunk_lines: int, source: str,
                pause: float = PAUSE_SECONDS) -> Iterator[list[str]]:
    """Texts of ``first`` then of ``stream``'s lines, ``chunk_lines`` at most a chunk; a chunk ends
    early when no line comes for ``pause`` seconds. A line that is not UTF-8 is a ``DataError``
    naming ``source`` and the line."""
    slots: queue.Queue = queue.Queue(maxsize=2 * chunk_lines)
    threading.Thread(target=_read_lines, args=(stream, slots), daemon=True).start()
    pending = list(first)
    line_number, offset = 0, 0  # offset: of the line's first byte in the input
    finished = False
    while not finished:
        raws = pending[:chunk_lines]
        pending = pending[chunk_lines:]
        while len(raws) < chunk_lines:
            try:
                item = slots.get(timeout=pause) if raws else slots.get()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                raise DataError(f"{source}: cannot be read ({getattr(item, 'strerror', None) or item})")
            if item is None:
                finished = True
                break
            raws.append(item)
        texts = []
        for raw in raws:
            line_number += 1
            start = offset
            offset += len(raw)
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3  # a byte-order mark, as some editors write, is not part of the text
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: line {line_number} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                                f"{start + e.start}); save the file as UTF-8") from None
            texts.append(text.rstrip("\n").removesuffix("\r"))
        if texts:
            yield texts


def predict_stream(clf: Classifier, stream: IO[bytes], source: str, form: str = "auto", output: str | None = None,
                   total: int | None = None) -> int:
    """Answer the request on ``stream`` (see the module's docstring) to stdout or ``output``;
    -> the number of texts answered. ``total``: the lines expected, for the ETA."""
    if form not in FORMATS:
        raise DataError(f"--format {form}: expected one of {list(FORMATS)}")
    first: list[bytes] = []
    for raw in stream:  # blank lines before the first text do not decide the request's kind
        first.append(raw)
        if raw.strip(b" \t\r\n\xef\xbb\xbf"):
            break
    head = b"".join(first).lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip()
    is_json = head[:1] in (b"{", b"[")
    answers = Answers(("json" if is_json else "jsonl") if form == "auto" else form, output)
    progress = None
    try:
        if is_json:
            data = b"".join(first) + stream.read()
            try:
                raw_text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: {not_utf8(e)}") from None
            texts = read_request(raw_text, source)
            answers.write(clf(texts))
        else:
            chunk_lines = max(8 * clf.batch_size, 256)
            progress = Progress(total)
            for texts in line_chunks(stream, first, chunk_lines, source):
                answers.write(clf.predictions(clf.logits_of_ids(clf.encode(texts))))
                progress.update(len(texts))
        answers.finish()
    except BaseException:
        answers.abandon()
        raise
    finally:
        if progress is not None:
            progress.close()
    return answers.count

