"""What every subcommand shares: the user-facing error, Kafka and metrics flags, signals."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable

from linewatch.wire import DEFAULT_TOPIC_PREFIX

log = logging.getLogger("linewatch")
FMT = argparse.RawDescriptionHelpFormatter


class CliError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


def common_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT[,...]",
                   help="Kafka bootstrap servers (the embedded broker prints its address)")
    p.add_argument("--topic-prefix", default=DEFAULT_TOPIC_PREFIX,
                   help="topics are PREFIX.frames, .scores, .alerts, .review, .labels, "
                        ".deadletter (default: %(default)s)")


def metrics_arg(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--metrics-port", type=int, default=default, metavar="PORT",
                   help="serve Prometheus metrics on this port (0 = any free port; "
                        "default: %(default)s = off)" if default is None else
                        "serve Prometheus metrics on this port (0 = any free port; default: %(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address for the metrics endpoint; 0.0.0.0 to let another host or "
                        "container scrape it (default: %(default)s)")


def install_stop_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the work in hand, then exiting",
                 signal.Signals(signum).name)
        stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
