"""The embedded broker's durable storage: a local S3 server that honours ``If-Match``.

Tansu's ``s3://`` engine keeps each partition's watermark and each consumer group's
state in objects it updates with conditional writes (``PUT`` with ``If-Match: ETAG``),
so that concurrent producers and group members cannot overwrite each other.
``localbucket`` (from PyPI) stores objects as plain files but honours only
``If-None-Match``; with ``If-Match`` ignored, two producers writing to one
partition were both told to write the same offset, one was refused
(UNKNOWN_SERVER_ERROR), watermarks went backwards after a restart and consumers
stalled (measured in the chaos benchmark). This module serves localbucket's
handler with ``If-Match`` checked and applied atomically.

    python -m linewatch.s3local DIR --port PORT
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import threading
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import localbucket

_conditional = threading.Lock()


class ConditionalHandler(localbucket.S3Handler):
    """localbucket's handler, with ``If-Match`` on PUT compared and written under one lock,
    and fast prefix listings."""

    # headers and body leave in separate writes; with Nagle's algorithm each small GET waited
    # ~40 ms for the client's delayed ACK (measured: 44-90 ms per 7 kB record batch)
    disable_nagle_algorithm = True

    def _list_objects_v2(self, bucket: str) -> None:
        """A prefix listing reads only the prefix's folder and answers in one page.

        localbucket walks the whole bucket for every page of 1,000 keys. Tansu lists all of a
        partition's records on every fetch, so with a few thousand records a fetch outlasted
        the consumer's fetch wait and reads stalled. Here: one folder scan and plain string
        XML, every key after the marker at once (more than S3's 1,000 per page, which the
        broker's client accepts); other listings go to localbucket as before.
        """
        prefix = self.query.get("prefix", "")
        folder = prefix.rpartition("/")[0]
        if not folder or self.query.get("delimiter") or self.query.get("encoding-type"):
            return super()._list_objects_v2(bucket)
        token = self.query.get("continuation-token")
        marker = self.query.get("start-after", "")
        if token is not None:
            decoded = base64.urlsafe_b64decode(token.encode()).decode(errors="replace")
            marker = max(marker, decoded[2:])
        bucket_dir = self._bucket_dir(bucket)
        try:
            entries = [e for e in os.scandir(bucket_dir / folder)
                       if e.is_file() and not e.name.startswith(localbucket.TEMP_PREFIX)]
        except FileNotFoundError:
            entries = []
        rows = []
        for e in sorted(entries, key=lambda e: e.name):
            key = f"{folder}/{e.name}"
            if not key.startswith(prefix) or (marker and key <= marker):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            rows.append(f"<Contents><Key>{escape(key)}</Key><LastModified>"
                        f"{localbucket.iso_timestamp(st.st_mtime)}</LastModified>"
                        f"<Size>{st.st_size}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        body = ("<?xml version='1.0' encoding='UTF-8'?>"
                f'<ListBucketResult xmlns="{localbucket.S3_NAMESPACE}"><Name>{escape(bucket)}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><MaxKeys>{max(1000, len(rows))}</MaxKeys>"
                f"<KeyCount>{len(rows)}</KeyCount><IsTruncated>false</IsTruncated>"
                + "".join(rows) + "</ListBucketResult>")
        self._send(HTTPStatus.OK, body.encode(), {"Content-Type": "application/xml"})

    def _write_object(self, bucket: str, key: str, write: Any) -> str:
        if_match = self.headers.get("If-Match")
        if if_match is None:
            return super()._write_object(bucket, key, write)
        with _conditional:
            target = self._object_path(bucket, key)
            if not target.is_file() or not localbucket.etag_matches(if_match,
                                                                    localbucket.object_etag(target)):
                raise self._precondition_failed_error()
            return super()._write_object(bucket, key, write)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: one line per request would drown the broker's own log."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linewatch.s3local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_root", type=Path, help="folder holding one folder per bucket")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    logging.getLogger("localbucket").setLevel(logging.WARNING)
    a.data_root.mkdir(parents=True, exist_ok=True)
    ConditionalHandler.data_root = a.data_root.resolve()
    server = ThreadingHTTPServer((a.host, a.port), ConditionalHandler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
