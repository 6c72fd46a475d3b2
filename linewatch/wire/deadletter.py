"""Dead letters on ``PREFIX.deadletter``: the original record, unchanged, plus why.

The value and headers are the original frame's (so the record can be inspected
or replayed); the reason and where it came from ride in ``lw-dl-*`` headers. A
copy is cut short only above the size limit, and then says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from linewatch.wire.frames import (
    DL_REASONS,
    H_CAMERA,
    H_SEQ,
    INT64_MAX,
    FrameRef,
    Headers,
    WireError,
    dead_letter_cause,
    headers_dict,
)

H_DL_REASON = "lw-dl-reason"
H_DL_DETAIL = "lw-dl-detail"
H_DL_SOURCE = "lw-dl-source"  # "topic/partition/offset" of the original record
H_DL_TRUNCATED = "lw-dl-truncated"  # original value length, when the copy was cut short
H_DL_WORKER = "lw-dl-worker"
MAX_DETAIL_BYTES = 500


@dataclass(frozen=True)
class DeadLetter:
    """What a dead-letter record says about its frame."""

    reason: str
    detail: str
    source: FrameRef
    worker: str
    camera: str | None = None  # from the original headers, when they name one
    seq: int | None = None
    original_bytes: int | None = None  # set when the copy of the value was cut short

    @property
    def cause(self) -> str:
        """``bad_input`` (the camera's fault) or ``failed`` (it could not be processed)."""
        return dead_letter_cause(self.reason)


def dead_letter_record(key: bytes | None, value: bytes | None, headers: Headers | None,
                       err: WireError, source: FrameRef, worker: str,
                       max_copy_bytes: int) -> tuple[bytes, bytes, Headers]:
    """(key, value, headers) of the dead letter for one record; ``err.reason`` is a DL reason."""
    if err.reason not in DL_REASONS:
        raise AssertionError(f"{err.reason!r} is not a dead-letter reason")
    payload = value or b""
    extra: Headers = [
        (H_DL_REASON, err.reason.encode()),
        (H_DL_DETAIL, err.detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]),
        (H_DL_SOURCE, str(source).encode()),
        (H_DL_WORKER, worker.encode()),
    ]
    if len(payload) > max_copy_bytes:
        extra.append((H_DL_TRUNCATED, str(len(payload)).encode()))
        payload = payload[:max_copy_bytes]
    return key or b"", payload, _sendable(headers) + extra


def _sendable(headers: Headers | None) -> Headers:
    """The original headers as a producer can send them again: a null value (legal on the
    wire; kafka-python reads it as None) becomes empty, and old ``lw-dl-*`` headers go."""
    out: Headers = []
    for k, v in headers or []:
        key = k if isinstance(k, str) else bytes(k).decode("utf-8", "replace")
        if not key.startswith("lw-dl-"):
            out.append((key, v if isinstance(v, bytes) else b"" if v is None else bytes(v)))
    return out


def without_payload(key: bytes, value: bytes, headers: Headers) -> tuple[bytes, bytes, Headers]:
    """The same dead letter with its copy of the value dropped (for a cluster that refuses
    the full copy as too large); the original length stays in ``lw-dl-truncated``."""
    h = [(k, v) for k, v in headers if k != H_DL_TRUNCATED]
    length = headers_dict(headers).get(H_DL_TRUNCATED) or str(len(value))
    return key, b"", [*h, (H_DL_TRUNCATED, length.encode())]


def parse_dead_letter(headers: Headers | None) -> DeadLetter:
    """Read a dead letter's headers; a record that is not one raises WireError."""
    h = headers_dict(headers)
    reason = h.get(H_DL_REASON, "")
    if reason not in DL_REASONS:
        raise WireError("bad_message", f"dead letter with reason {reason[:40]!r}")
    try:
        topic, partition, offset = h.get(H_DL_SOURCE, "").rsplit("/", 2)
        source = FrameRef(topic, int(partition), int(offset))
    except ValueError as exc:
        raise WireError("bad_message", f"dead letter source {h.get(H_DL_SOURCE, '')[:80]!r} is not "
                                       "TOPIC/PARTITION/OFFSET") from exc
    seq_text = h.get(H_SEQ, "")
    digits = seq_text.isascii() and seq_text.isdigit() and len(seq_text) < 20
    seq = int(seq_text) if digits and int(seq_text) <= INT64_MAX else None
    truncated = h.get(H_DL_TRUNCATED, "")
    return DeadLetter(reason=reason, detail=h.get(H_DL_DETAIL, ""), source=source,
                      worker=h.get(H_DL_WORKER, ""), camera=h.get(H_CAMERA) or None, seq=seq,
                      original_bytes=int(truncated) if truncated.isascii() and truncated.isdigit() else None)
