"""What every command line shares: one-line errors, and exit codes a script can act on.

    0   done
    2   a problem the user can fix, printed as one line ``error: ...`` naming the file, key or value
    75  interrupted (SIGTERM, Ctrl-C): a checkpoint was saved where there was something to save, and
        rerunning the same command resumes (75 is EX_TEMPFAIL: "try again")

``--debug`` (or ``FLAXSST_DEBUG=1``) shows the traceback behind an error. Any exception that is not
a ``FlaxsstError`` is a bug and always keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 75

# Refusals of the file system over paths the user chose; any other OSError keeps its traceback.
USER_FILE_ERRORS = (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError)


def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph as one line, for ``--help``."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--debug`` and one-line usage errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def run(main: Callable[[argparse.Namespace], int], parser: ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, start JAX quietly, run ``main(args)`` and turn errors into exit codes."""
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    debug = args.debug or os.environ.get("FLAXSST_DEBUG", "0") not in ("", "0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flaxsst").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every save
    for library in ("datasets", "huggingface_hub"):  # each prints through its own handler: once is enough
        logging.getLogger(library).propagate = False
    from flaxsst.errors import FlaxsstError, Interrupted

    try:
        return main(args)
    except KeyboardInterrupt:  # Ctrl-C where no handler of ours saves anything (evaluate, predict, aot, start-up)
        if debug:
            raise
        print("interrupted; nothing was saved, rerun the same command", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # at once: tearing the interpreter down under XLA's compiling threads can crash it
    except Interrupted as error:
        if debug:
            raise
        print(f"{error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FlaxsstError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        if debug:
            raise
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on the device writing {error.filename or 'a file'}; free the space, "
                  "then rerun the same command", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(error, USER_FILE_ERRORS) and error.filename:  # the user's file system, not a bug
            print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
