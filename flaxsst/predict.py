"""``python -m flaxsst.predict`` (and ``flaxsst-predict``): classify texts from the command line.

``--model DIR_OR_HUB_ID`` reads JSON ``{"input_data": [...]}`` or a JSON list of texts and prints the
JSON list, or one text per line and streams a JSON line per text (``flaxsst.predict_stream``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from flaxsst import cli
from flaxsst.classifier import Classifier
from flaxsst.errors import DataError
from flaxsst.predict_stream import check_output_file, count_lines, predict_stream
from flaxsst.signals import as_ctrl_c, handling


def main(args: argparse.Namespace) -> int:
    source = f"--input {args.input}" if args.input else "stdin"
    if args.output:
        check_output_file(args.output)
    try:
        stream = open(args.input, "rb") if args.input else sys.stdin.buffer
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror or e})") from None
    with stream, handling(as_ctrl_c, [signal.SIGTERM]):  # --output's temporary file goes, the old file stays
        total = count_lines(args.input) if args.input else None
        clf = Classifier.from_pretrained(args.model, dtype=args.dtype, batch_size=args.batch_size,
                                         max_length=args.max_length, length_step=args.length_step, key="--model")
        predict_stream(clf, stream, source, args.format, args.output, total)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m flaxsst.predict",
        description='Classify texts. One text per line (stdin or --input) is answered as it is read: a JSON '
                    'line per text, in input order, memory flat whatever the input size, progress on stderr. '
                    'JSON {"input_data": [...]} or a JSON list is answered with a JSON list.',
    )
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--input", help="read this file instead of stdin")
    p.add_argument("--output", help="write the answers to this file (atomically: complete or not at all) "
                                    "instead of stdout")
    p.add_argument("--format", choices=["auto", "jsonl", "json"], default="auto",
                   help="jsonl: one JSON object per line; json: one JSON list; auto (default): jsonl for "
                        "one text per line, json for a JSON request")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (default: 24 on a CPU, 128 elsewhere)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--length-step", type=int, default=None,
                   help="pad batches to multiples of this many tokens: fewer programs to compile (default: the "
                        "backend's lengths, flaxsst.batching)")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype: float32, bfloat16, or int8 (int8 dense layers on an x86-64 CPU)")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``flaxsst-predict`` and ``python -m flaxsst.predict``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
