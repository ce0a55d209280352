"""``python -m flaxsst.serve`` (and ``flaxsst-serve``): load the model, open the port, warm up, serve.

Start-up: the model loads before the port opens (a model that cannot load is one line ``error:
...`` and exit 2, as is a port that cannot be bound); then the port opens with ``/health`` alive and
``/ready`` 503 (its body: programs done of the total, elapsed seconds, an ETA; a log line every 5 s)
while every program the server runs is loaded from the program store or compiled and stored;
``/ready`` is 200 from then on, and nothing compiles while serving (``/metrics`` counts it if
anything does). ``--prepare`` does the compiling and builds the packed-dot kernel ahead of time and
exits, for a container image or a volume; the server itself never builds the kernel.

Shutdown: SIGTERM or Ctrl-C makes ``/ready`` 503 at once and every answer from then on carries
``Connection: close`` (a keep-alive client sends its next request on a new connection, which a load
balancer routes to another replica, instead of on one this server is about to close); the listener
stays open for ``--drain-grace-s`` (load balancers see the 503 and stop sending), then closes; every
request already received is answered, and the process exits 0 within ``--drain-grace-s`` plus
``--timeout-ms``. A signal during the warm-up stops it (the programs compiling finish) and exits at
once. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from flaxsst import cli
from flaxsst.errors import ConfigError, FlaxsstError
from flaxsst.serve.service import Settings
from flaxsst.signals import handling

log = logging.getLogger("flaxsst.serve")
DEFAULTS = Settings()


class DrainingServer:
    """uvicorn's server with a drain: the first signal marks the app draining and closes the listener
    ``grace_s`` later; uvicorn then waits for the requests in flight (``timeout_graceful_shutdown``)."""

    def __init__(self, config, grace_s: float, draining: threading.Event, ready: Callable[[], bool] = lambda: True):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # uvicorn's re-raises the signal after shutdown: here a drain is a clean exit
                with handling(outer.handle_signal):
                    yield

        self.server = Server(config)
        self.grace_s = grace_s
        self.draining = draining
        self.ready = ready
        self.failed = False

    def handle_signal(self, sig: int, frame) -> None:
        if self.draining.is_set():
            if sig == signal.SIGINT:
                self.server.should_exit = self.server.force_exit = True
            return
        self.draining.set()
        if not self.ready():  # no load balancer routes here yet: nothing to drain, the warm-up stops
            log.info("%s: stopping the warm-up", signal.Signals(sig).name)
            self.close()
            return
        log.info("%s: draining; /ready is 503, answers close their connections, the listener closes in %.1f s",
                 signal.Signals(sig).name, self.grace_s)
        timer = threading.Timer(self.grace_s, self.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self.server.should_exit = True

    def fail(self) -> None:
        """The model cannot serve (its warm-up failed): stop at once, and ``run`` returns False."""
        self.failed = True
        self.server.should_exit = self.server.force_exit = True

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
    except (OSError, OverflowError) as e:  # OverflowError: a port past 65535
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({getattr(e, 'strerror', None) or e})") from None
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

    from flaxsst.serve.app import create_app
    from flaxsst.serve.metrics import Metrics
    from flaxsst.serve.service import Service, load_classifier

    clf = load_classifier(args.model, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
                          length_step=args.length_step, build_kernel=args.prepare)
    if args.prepare:
        return prepare(clf)
    settings = Settings(max_batch_texts=args.max_batch_texts, max_batch_tokens=args.max_batch_tokens,
                        max_batch_delay_ms=args.max_batch_delay_ms, max_queue=args.max_queue, max_texts=args.max_texts,
                        max_body_bytes=args.max_body_bytes, timeout_ms=args.timeout_ms,
                        ).resolved(jax.default_backend(), clf.batch_size)
    metrics = Metrics()
    service = Service(clf, settings, on_batch=metrics.observe_batch, on_fatal=lambda error: server.fail())
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    draining = threading.Event()
    app = create_app(service, metrics, draining=draining.is_set, stop_timeout_s=settings.timeout_s + 5,
                     model_name=args.model_name or default_model_name(args.model))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.timeout_s + 5), timeout_keep_alive=30)
    server = DrainingServer(config, args.drain_grace_s, draining, ready=service.ready.is_set)
    log.info("listening on http://%s:%d (%s, %s, batches of up to %d texts / %d tokens, %.1f ms delay); warming up "
             "%d programs", host if ":" not in host else f"[{host}]", port, jax.default_backend(), dense_layers(clf),
             settings.max_batch_texts, settings.max_batch_tokens, settings.max_batch_delay_ms,
             service.warm_up.total)
    drained = server.run([sock])
    if server.failed:
        raise FlaxsstError("the warm-up failed (the traceback is above); nothing was served")
    log.info("stopped" if drained else "stopped without draining (second Ctrl-C)")
    return cli.EXIT_OK if drained else cli.EXIT_INTERRUPTED


def dense_layers(clf) -> str:
    """How the served model's dense layers run, for the start-up lines."""
    import jax.numpy as jnp

    if clf.int8_lanes:
        return f"int8 dense layers, {clf.int8_lanes} lanes"
    if clf.packed_lanes:
        return f"packed float32 dense layers, {clf.packed_lanes} lanes"
    return f"{jnp.dtype(clf.precision.dtype).name} dense layers"


def default_model_name(model: str) -> str:
    """The model's name in the Open Inference Protocol's paths: its folder's name (``run/export`` is
    ``export``), or a hub id's last part."""
    return Path(model.rstrip("/\\")).name or "model"


def prepare(clf) -> int:
    """``--prepare``: every program the server runs compiled into the program store, and the packed-dot
    kernel built, so that a later start with the same flags loads them (a container image's build step)."""
    from flaxsst import packed_dot, program_store
    from flaxsst.serve.service import WarmUp

    progress = WarmUp(len(clf.program_shapes()))
    progress.run(clf)
    where = program_store.ProgramStore(clf.store_key).folder if program_store.enabled() else "nowhere (FLAXSST_PROGRAM_STORE=0)"
    log.info("prepared: %d programs in %.1f s, stored in %s; packed-dot kernel: %s", progress.total, progress.seconds,
             where,
             f"{packed_dot.kernel_dir()} ({dense_layers(clf)})" if clf.packed_lanes or clf.int8_lanes else "not used here")
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.serve", description=cli.first_paragraph(__doc__))
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--model-name", default=None,
                   help="the model's name in the Open Inference Protocol's paths (/v2/models/NAME/infer; default: "
                        "the --model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port, printed at start)")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype: float32, bfloat16, or int8 (int8 dense layers on an x86-64 CPU)")
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
    p.add_argument("--max-queue", type=positive(int), default=DEFAULTS.max_queue, help="requests waiting before 429")
    p.add_argument("--max-texts", type=positive(int), default=DEFAULTS.max_texts, help="texts in one request before 413")
    p.add_argument("--max-body-bytes", type=positive(int), default=DEFAULTS.max_body_bytes, help="body size before 413")
    p.add_argument("--timeout-ms", type=positive(float), default=DEFAULTS.timeout_ms, help="time to answer before 504")
    p.add_argument("--prepare", action="store_true",
                   help="compile every program these flags make into the program store and build the packed-dot "
                        "kernel, then exit, so a later start with the same flags is ready in seconds (run it when "
                        "building a container image; FLAXSST_HOME names the folder)")
    p.add_argument("--drain-grace-s", type=non_negative_float, default=2.0,
                   help="after SIGTERM or Ctrl-C, how long the listener stays open with /ready 503")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``flaxsst-serve`` and ``python -m flaxsst.serve``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
