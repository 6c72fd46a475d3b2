"""``linewatch alert-log``: an Alertmanager webhook receiver that keeps an audit log.

Pagers and chat tools come and go; what a plant needs to keep is a plain record
of every alert that fired and when it resolved, next to the frames it concerns.
Each alert of each notification becomes one JSON line (to a file and to the
log). Alertmanager retries a delivery that is not answered 2xx, so a line is
only acknowledged once it is written and flushed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024


def alert_records(payload: dict[str, Any], received_ns: int) -> list[dict[str, Any]]:
    """One flat record per alert of an Alertmanager webhook payload (version 4)."""
    if payload.get("version") != "4" or not isinstance(payload.get("alerts"), list):
        raise ValueError("not an Alertmanager webhook payload (version 4 with an 'alerts' list)")
    out = []
    for a in payload["alerts"]:
        labels = dict(a.get("labels") or {})
        out.append({
            "received_ns": received_ns,
            "status": a.get("status"),
            "alertname": labels.get("alertname"),
            "labels": labels,
            "annotations": dict(a.get("annotations") or {}),
            "starts_at": a.get("startsAt"),
            "ends_at": a.get("endsAt"),
            "receiver": payload.get("receiver"),
        })
    return out


class AlertLog:
    """Append-only JSON-lines file (optional) plus a callback for each record."""

    def __init__(self, path: str | Path | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(path) if path else None
        self.on_record = on_record
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as fh:
                    for r in records:
                        fh.write(json.dumps(r, sort_keys=True) + "\n")
                    fh.flush()
            for r in records:
                log.info("%s %s %s", str(r["status"]).upper(), r["alertname"],
                         r["annotations"].get("summary", r["labels"]))
                if self.on_record is not None:
                    self.on_record(r)


def make_server(host: str, port: int, sink: AlertLog) -> ThreadingHTTPServer:
    """A server answering POST (any path) with Alertmanager payloads and GET /-/healthy."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # route through logging, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def _reply(self, status: HTTPStatus, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in ("/-/healthy", "/-/ready"):
                self._reply(HTTPStatus.OK, "ok")
            else:
                self._reply(HTTPStatus.NOT_FOUND, "POST Alertmanager webhooks here; GET /-/healthy")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY_BYTES:
                self._reply(HTTPStatus.BAD_REQUEST, f"body must be 1..{MAX_BODY_BYTES} bytes")
                return
            try:
                payload = json.loads(self.rfile.read(length))
                records = alert_records(payload, time.time_ns())
            except (ValueError, AttributeError) as exc:
                log.warning("rejected a webhook from %s: %s", self.address_string(), exc)
                self._reply(HTTPStatus.BAD_REQUEST, str(exc))
                return
            try:
                sink.write(records)
            except OSError as exc:  # not acknowledged: Alertmanager will retry
                log.error("could not write the alert log: %s", exc)
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, f"alert log not writable: {exc}")
                return
            self._reply(HTTPStatus.OK, f"logged {len(records)} alert(s)")

    return ThreadingHTTPServer((host, port), Handler)
