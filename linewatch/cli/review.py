"""The review page's processes: ``review`` (the service) and ``operators`` (who may sign in)."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from linewatch.cli._common import FMT, CliError, common_kafka, install_stop_signals, log, metrics_arg
from linewatch.wire import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_PIXELS


def add_commands(sub: Any) -> None:
    r = sub.add_parser("review", formatter_class=FMT, help="the operator review page for borderline frames",
                       description="Consume PREFIX.review into a durable store, serve the review page "
                                   "(frame, heatmap, score, explanation; normal / defect / skip with "
                                   "keyboard shortcuts) and publish verdicts, signed with "
                                   "LINEWATCH_LABEL_KEY, to PREFIX.labels. Operators sign in with their "
                                   "own name and password (add them with `linewatch operators add`); "
                                   "without a session every page and API answers 401.")
    common_kafka(r)
    r.add_argument("--port", type=int, default=8080, help="web port (default: %(default)s)")
    r.add_argument("--host", default="127.0.0.1",
                   help="listen address; 0.0.0.0 for other machines (default: %(default)s)")
    db_arg(r)
    r.add_argument("--lease-seconds", type=float, default=120.0,
                   help="how long an operator holds an item before others may take it "
                        "(default: %(default)s)")
    r.add_argument("--retention-days", type=float, default=30.0,
                   help="delete review items older than this (labelled ones once their label was "
                        "sent); checked hourly (default: %(default)s)")
    r.add_argument("--session-hours", type=float, default=12.0,
                   help="how long a sign-in lasts (default: %(default)s)")
    r.add_argument("--group-id", default="linewatch-review", help="default: %(default)s")
    r.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES,
                   help="largest picture accepted inside a review item (default: %(default)s)")
    r.add_argument("--max-frame-pixels", type=int, default=DEFAULT_MAX_FRAME_PIXELS,
                   help="default: %(default)s")
    r.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    metrics_arg(r, None)

    op = sub.add_parser("operators", formatter_class=FMT, help="who may sign in to the review page",
                        description="Add, list or remove the operators of the review page. Each has "
                                    "a name and a password (scrypt-hashed in the review database); "
                                    "verdicts are recorded under the name they signed in with.")
    osub = op.add_subparsers(dest="operators_command", metavar="ACTION", required=True)
    oa = osub.add_parser("add", help="add an operator, or set a new password (ends their sessions)")
    oa.add_argument("name")
    oa.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input instead of prompting")
    db_arg(oa)
    orm = osub.add_parser("remove", help="remove an operator and end their sessions")
    orm.add_argument("name")
    db_arg(orm)
    db_arg(osub.add_parser("list", help="list the operators"))
    r.set_defaults(run=cmd_review)
    op.set_defaults(run=cmd_operators)


def db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="sqlite:///linewatch-review.db",
                   help="SQLAlchemy database URL of the review store; a production database, e.g. "
                        "postgresql+psycopg://user@host/linewatch (default: %(default)s)")


def _open_store(a: argparse.Namespace, **kw: object):
    from linewatch.review.store import ReviewStore

    try:
        return ReviewStore(a.db, **kw)  # type: ignore[arg-type]
    except Exception as exc:
        raise CliError(f"cannot open the review database {a.db}: {exc}") from None


def cmd_review(a: argparse.Namespace) -> int:
    import uvicorn

    from linewatch.review.app import create_app
    from linewatch.review.service import ReviewBridge
    from linewatch.wire import LABEL_KEY_ENV, Topics, label_key
    from monitoring import metrics

    try:
        key = label_key()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if key is None:
        raise CliError(f"set {LABEL_KEY_ENV} to a secret of at least 16 characters, the same one the "
                       f"workers get: they apply only labels signed with it (e.g. `export "
                       f"{LABEL_KEY_ENV}=$(openssl rand -hex 32)`)")
    store = _open_store(a, lease_s=a.lease_seconds, max_image_bytes=a.max_frame_bytes,
                        max_image_pixels=a.max_frame_pixels)
    if not store.operators():
        log.warning("no operator can sign in yet: add one with `linewatch operators add NAME --db %s`",
                    a.db)
    if a.metrics_port is not None:
        metrics.serve(a.metrics_port, a.metrics_host)
    bridge = ReviewBridge(a.bootstrap_servers, Topics(a.topic_prefix), store, key, a.group_id,
                          retention_s=a.retention_days * 86400).start()
    app = create_app(store, session_hours=a.session_hours)
    app.state.on_labelled = bridge.wake.set
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    install_stop_signals(lambda: setattr(server, "should_exit", True))
    print(f"review page on http://{a.host}:{a.port}/ (store {a.db})", flush=True)
    if a.ready_file:
        threading.Thread(target=_ready_when_serving, args=(server, a.ready_file), daemon=True).start()
    try:
        server.run()
    finally:
        bridge.close()
    return 0


def cmd_operators(a: argparse.Namespace) -> int:
    import getpass

    from linewatch.review.store import ReviewError

    store = _open_store(a)
    try:
        if a.operators_command == "list":
            print("\n".join(store.operators()) or "(no operators)")
        elif a.operators_command == "remove":
            if not store.remove_operator(a.name):
                raise CliError(f"no operator named {a.name!r}")
            print(f"removed {a.name} (their sessions ended)")
        else:
            if a.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {a.name}: ")
                if getpass.getpass("again: ") != password:
                    raise CliError("the two passwords differ")
            store.add_operator(a.name, password)
            print(f"operator {a.name} can sign in to the review page")
    except ReviewError as exc:
        raise CliError(str(exc)) from None
    return 0


def _ready_when_serving(server: object, path: str) -> None:
    import time
    from pathlib import Path

    while not getattr(server, "started", False):
        time.sleep(0.05)
    Path(path).write_text("ready\n")
