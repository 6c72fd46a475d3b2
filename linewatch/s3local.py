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
import bisect
import logging
import os
import threading
import xml.etree.ElementTree as ET
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import localbucket

_conditional = threading.Lock()


class ConditionalHandler(localbucket.S3Handler):
    """localbucket's handler, with ``If-Match`` on PUT compared and written under one lock,
    and listings that read only the prefix's own folder (localbucket walks the whole bucket
    for every page, and Tansu lists a partition's records on every fetch: with a few
    thousand records a fetch took longer than a consumer's fetch wait, and reads stalled)."""

    def _list_entries(self, bucket_dir: Path, prefix: str, delimiter: str, marker: str,
                      marker_is_prefix: bool, max_keys: int) -> Any:
        folder, _, _rest = prefix.rpartition("/")
        if delimiter or marker_is_prefix or not folder:
            return super()._list_entries(bucket_dir, prefix, delimiter, marker,
                                         marker_is_prefix, max_keys)
        base = bucket_dir / folder
        try:
            names = sorted(e.name for e in os.scandir(base)
                           if e.is_file() and not e.name.startswith(localbucket.TEMP_PREFIX))
        except FileNotFoundError:
            names = []
        keys = [f"{folder}/{n}" for n in names]
        keys = [k for k in keys if k.startswith(prefix)]  # byte order equals str order for ASCII keys
        start = bisect.bisect_right(keys, marker) if marker else 0
        page = keys[start:start + max_keys]
        truncated = max_keys > 0 and start + max_keys < len(keys)
        contents = [(k, bucket_dir / k) for k in page]
        return contents, [], truncated, ("K:" + page[-1]) if page else ""

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

    def _add_list_entries(self, root: Any, contents: list[tuple[str, Path]],
                          common_prefixes: list[str], encode: Any) -> None:
        """As localbucket's, without each object's ETag (optional in a listing; it costs an
        MD5 of the file the first time)."""
        for key, path in contents:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            item = ET.SubElement(root, "Contents")
            ET.SubElement(item, "Key").text = encode(key)
            ET.SubElement(item, "LastModified").text = localbucket.iso_timestamp(stat.st_mtime)
            ET.SubElement(item, "Size").text = str(stat.st_size)
            ET.SubElement(item, "StorageClass").text = "STANDARD"
        for common in common_prefixes:
            ET.SubElement(ET.SubElement(root, "CommonPrefixes"), "Prefix").text = encode(common)

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
