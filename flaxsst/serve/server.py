"""``python -m flaxsst.serve`` (and ``flaxsst-serve``): load the model, open the port, warm up, serve.

Start-up: the model loads before the port opens (a model that cannot load is one line ``error:
...`` and exit 2, as is a port that cannot be bound); then the port opens with ``/health`` alive and
``/ready`` 503 while every program the batcher uses compiles (or loads from the compilation cache)
and runs once; ``/ready`` is 200 from then on, and nothing compiles while serving.

Shutdown: SIGTERM or Ctrl-C makes ``/ready`` 503 at once; the listener stays open for
``--drain-grace-s`` (load balancers see the 503 and stop sending), then closes; every request
already received is answered, and the process exits 0 within ``--drain-grace-s`` plus
``--timeout-ms``. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from typing import Sequence

from flaxsst import cli
from flaxsst.errors import ConfigError, FlaxsstError

log = logging.getLogger("flaxsst.serve")

# On a CPU a shared batch holds several of Classifier's batches: it sorts them by length before it cuts
# them, so each is padded close to its own texts (a batch of 24 texts in arrival order pads to the
# longest of 24 random lengths, ~2x the tokens SST-2 needs), and runs two of them at once.
CPU_DEFAULTS = {"batches_per_call": 5, "max_batch_tokens": 4096, "max_batch_delay_ms": 2.0}
ACCELERATOR_DEFAULTS = {"batches_per_call": 1, "max_batch_tokens": 16384, "max_batch_delay_ms": 1.0}


class DrainingServer:
    """uvicorn's server with a drain: the first signal marks the app draining and closes the listener
    ``grace_s`` later; uvicorn then waits for the requests in flight (``timeout_graceful_shutdown``)."""

    def __init__(self, config, grace_s: float, draining: threading.Event):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # uvicorn's re-raises the signal after shutdown: here a drain is a clean exit
                handled = (signal.SIGINT, signal.SIGTERM)
                previous = {sig: signal.signal(sig, outer.handle_signal) for sig in handled}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.server = Server(config)
        self.grace_s = grace_s
        self.draining = draining

    def handle_signal(self, sig: int, frame) -> None:
        if self.draining.is_set():
            if sig == signal.SIGINT:
                self.server.should_exit = self.server.force_exit = True
            return
        self.draining.set()
        log.info("%s: draining; /ready is 503, the listener closes in %.1f s", signal.Signals(sig).name, self.grace_s)
        timer = threading.Timer(self.grace_s, self.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self.server.should_exit = True

    def run(self, sockets: list[socket.socket]) -> bool:
        """Serve until drained; ``False`` when a second Ctrl-C cut the drain short."""
        self.server.run(sockets=sockets)
        return not self.server.force_exit


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or a ``ConfigError`` naming them."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def main(args: argparse.Namespace) -> int:
    import jax

    try:
        import uvicorn
    except ImportError:
        raise FlaxsstError("python -m flaxsst.serve needs the serve extra: pip install 'flaxsst[serve]'") from None

    from flaxsst import Classifier
    from flaxsst.serve.app import Limits, create_app
    from flaxsst.serve.batcher import Batcher

    clf = Classifier.from_pretrained(args.model, dtype=args.dtype, batch_size=args.batch_size,
                                     max_length=args.max_length, length_step=args.length_step, key="--model")
    defaults = CPU_DEFAULTS if jax.default_backend() == "cpu" else ACCELERATOR_DEFAULTS
    max_batch_texts = args.max_batch_texts or defaults["batches_per_call"] * clf.batch_size
    max_batch_tokens = args.max_batch_tokens or defaults["max_batch_tokens"]
    delay_ms = defaults["max_batch_delay_ms"] if args.max_batch_delay_ms is None else args.max_batch_delay_ms
    batcher = Batcher(clf, max_batch_texts=max_batch_texts, max_batch_tokens=max_batch_tokens,
                      max_delay_s=delay_ms / 1e3, max_queue=args.max_queue)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, timeout_s=args.timeout_ms / 1e3)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    draining = threading.Event()
    app = create_app(clf, batcher, limits, draining=draining.is_set, stop_timeout_s=limits.timeout_s + 5)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(limits.timeout_s + 5), timeout_keep_alive=30)
    server = DrainingServer(config, args.drain_grace_s, draining)
    log.info("listening on http://%s:%d (%s, batches of up to %d texts / %d tokens, %.1f ms delay); warming up "
             "%d programs", host if ":" not in host else f"[{host}]", port, jax.default_backend(), max_batch_texts,
             max_batch_tokens, delay_ms, len(clf.program_shapes()))
    drained = server.run([sock])
    log.info("stopped" if drained else "stopped without draining (second Ctrl-C)")
    return cli.EXIT_OK if drained else cli.EXIT_INTERRUPTED


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.serve", description=cli.first_paragraph(__doc__))
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port, printed at start)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="rows of the largest compiled batch (default: the backend's, 24 on a CPU, 128 elsewhere)")
    p.add_argument("--max-length", type=positive(int), default=128, help="tokens a text is cut to")
    p.add_argument("--length-step", type=positive(int), default=None,
                   help="pad batches to multiples of this many tokens: fewer programs, a shorter warm-up (default: "
                        "the backend's lengths, flaxsst.batching)")
    p.add_argument("--max-batch-texts", type=positive(int), default=None,
                   help="texts in one shared batch (default: 5 x --batch-size on a CPU, --batch-size elsewhere)")
    p.add_argument("--max-batch-tokens", type=positive(int), default=None,
                   help="tokens in one shared batch (default: 4096 on a CPU, 16384 elsewhere)")
    p.add_argument("--max-batch-delay-ms", type=non_negative_float, default=None,
                   help="how long the oldest waiting text waits for a batch to fill (default: 2 on a CPU, 1 elsewhere)")
    p.add_argument("--max-queue", type=positive(int), default=256, help="requests waiting before 429")
    p.add_argument("--max-texts", type=positive(int), default=1024, help="texts in one request before 413")
    p.add_argument("--max-body-bytes", type=positive(int), default=4 * 1024 * 1024, help="body size before 413")
    p.add_argument("--timeout-ms", type=positive(float), default=30000, help="time to answer before 504")
    p.add_argument("--drain-grace-s", type=non_negative_float, default=2.0,
                   help="after SIGTERM or Ctrl-C, how long the listener stays open with /ready 503")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``flaxsst-serve`` and ``python -m flaxsst.serve``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
