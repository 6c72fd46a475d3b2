"""``linewatch``: the command line of the anomaly monitor.

Each subcommand is one process of the deployment (broker, producer, worker,
review) or a whole local setup (demo). This package only parses and dispatches:
scorers are built from :class:`inference.settings.ScorerSettings`, workers by
:mod:`consumers.assembly`. Heavy imports (torch, kafka) happen inside the
subcommand that needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from linewatch import __version__
from linewatch.cli import models, review, services, worker
from linewatch.cli._common import FMT, CliError

__all__ = ["METHODS", "CliError", "build_parser", "main"]

METHODS = models.METHODS

EPILOG = """\
typical local run (no Docker, everything on this machine):
  linewatch demo --frames 200

production (Apache Kafka cluster at kafka:9092):
  linewatch topics  --bootstrap-servers kafka:9092 --partitions 12
  linewatch produce --bootstrap-servers kafka:9092 --source rtsp://cam-7/stream --camera cam-7 --line L2
  linewatch worker  --bootstrap-servers kafka:9092 --references refs/ --holdout holdout/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linewatch", formatter_class=FMT, epilog=EPILOG,
        description="Streaming visual anomaly monitor: cameras -> Kafka -> few-shot scoring "
                    "workers -> scores, alerts, human review, metrics.")
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: %(default)s")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    services.add_commands(sub)
    worker.add_commands(sub)
    models.add_commands(sub)
    review.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        return args.run(args)
    except CliError as exc:
        print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # named errors from our modules are user-facing too
        from linewatch.broker import BrokerError

        if isinstance(exc, BrokerError):
            print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
