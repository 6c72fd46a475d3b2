"""Frames on ``PREFIX.frames``: raw encoded image as the value, metadata as headers.

Also what every message kind shares: topic names, the id rule for cameras and
lines, the size limits, and :class:`WireError` with its bounded set of reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FRAME_SCHEMA = 1
SUPPORTED_FRAME_SCHEMAS = frozenset({FRAME_SCHEMA})

DEFAULT_TOPIC_PREFIX = "linewatch"
TOPIC_KINDS = ("frames", "scores", "alerts", "review", "labels", "deadletter")

ENCODINGS = ("jpeg", "png")
# Default largest encoded frame the project accepts. Kafka's own default
# message.max.bytes is ~1 MB; a production cluster that carries 4K frames must
# raise it (see README), and the embedded test broker enforces nothing, which
# is exactly why the limit is enforced here, on both sides.
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
# Largest decoded frame (pixels): a tiny JPEG can declare a 60000x60000 image.
DEFAULT_MAX_FRAME_PIXELS = 40_000_000
# Frame sides are checked before any pixel is decoded; no camera makes 100k-pixel sides.
MAX_FRAME_SIDE = 100_000
INT64_MAX = 2**63 - 1  # sequence numbers and nanosecond times are 64-bit everywhere they are stored

# Camera and line ids: one rule for producers, workers, the review store and metric labels.
# Letters, digits, space and . _ @ + -, 1 to 64 characters, no space at either end. No ':' (an
# item id is CAMERA:SEQ) and no '/' (a dead letter's source is TOPIC/PARTITION/OFFSET).
ID_PATTERN = r"[A-Za-z0-9._@+-](?:[A-Za-z0-9 ._@+-]{0,62}[A-Za-z0-9._@+-])?"
ID_RE = re.compile(ID_PATTERN)
ID_RULE = "1-64 letters, digits, spaces and . _ @ + - (no space at either end)"

# Frame headers (all values UTF-8 strings).
H_SCHEMA = "lw-schema"
H_CAMERA = "lw-camera"
H_LINE = "lw-line"
H_SEQ = "lw-seq"
H_CAPTURE_NS = "lw-capture-ns"
H_ENCODING = "lw-encoding"
H_WIDTH = "lw-width"
H_HEIGHT = "lw-height"
H_TRUTH = "lw-truth"  # optional ground truth ("normal"/"defect"), demo and evaluation feeds
REQUIRED_FRAME_HEADERS = (H_SCHEMA, H_CAMERA, H_LINE, H_SEQ, H_CAPTURE_NS, H_ENCODING,
                          H_WIDTH, H_HEIGHT)

# Reasons a frame can be dead-lettered (bounded set: they become a metric label).
# The first ten say the input was bad; the last two that the frame could not be processed
# although the input looked valid (see DL_FAILURE_REASONS).
DL_REASONS = (
    "missing_header",
    "bad_header",
    "unknown_schema",
    "empty_payload",
    "too_large",
    "too_many_pixels",
    "not_an_image",
    "truncated_image",
    "encoding_mismatch",
    "size_mismatch",
    "scoring_failed",      # the model failed on this frame alone, repeatedly, while it scored others
    "processing_failed",   # routing this frame failed even without explanations
)
DL_FAILURE_REASONS = frozenset({"scoring_failed", "processing_failed"})
# Reasons a JSON message (score, alert, review item, label) is refused by its reader.
MESSAGE_REASONS = ("bad_message", "unknown_schema", "unsigned", "bad_signature", "bad_image")
WIRE_REASONS = frozenset(DL_REASONS) | frozenset(MESSAGE_REASONS)


def dead_letter_cause(reason: str) -> str:
    """``bad_input`` or ``failed``: counted apart, since only the first is the camera's fault."""
    return "failed" if reason in DL_FAILURE_REASONS else "bad_input"


class WireError(ValueError):
    """A record does not follow the contract; ``reason`` is one of WIRE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in WIRE_REASONS:
            raise AssertionError(f"unknown wire error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_id(what: str, value: object, reason: str = "bad_header") -> str:
    """``value`` if it is a valid camera/line id, else WireError naming ``what`` and the rule."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        shown = value if not isinstance(value, str) else value[:80]
        raise WireError(reason, f"{what} {shown!r} is not a valid id: {ID_RULE}")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one deployment; the prefix lets several lines share a cluster."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    def __getattr__(self, kind: str) -> str:  # topics.frames -> "linewatch.frames"
        if kind in TOPIC_KINDS:
            return f"{self.prefix}.{kind}"
        raise AttributeError(kind)

    def all(self) -> list[str]:
        return [f"{self.prefix}.{k}" for k in TOPIC_KINDS]


Headers = list[tuple[str, bytes]]


def headers_dict(headers: Headers | None) -> dict[str, str]:
    """Headers as text, for logs and dead-letter inspection (bad bytes replaced)."""
    return {str(k): (v or b"").decode("utf-8", "replace") for k, v in headers or []}


@dataclass(frozen=True)
class FrameMeta:
    """Metadata of one camera frame, carried in the record headers."""

    camera: str
    line: str
    seq: int
    capture_ns: int
    encoding: str
    width: int
    height: int
    truth: str | None = None
    schema: int = FRAME_SCHEMA

    def __post_init__(self) -> None:
        check_id("camera", self.camera)
        check_id("line", self.line)

    @property
    def key(self) -> bytes:
        return self.camera.encode()

    @property
    def frame_id(self) -> str:
        """Unique per camera: ``camera:seq``. Never a metric label."""
        return f"{self.camera}:{self.seq}"

    def headers(self) -> Headers:
        h = [
            (H_SCHEMA, str(self.schema)),
            (H_CAMERA, self.camera),
            (H_LINE, self.line),
            (H_SEQ, str(self.seq)),
            (H_CAPTURE_NS, str(self.capture_ns)),
            (H_ENCODING, self.encoding),
            (H_WIDTH, str(self.width)),
            (H_HEIGHT, str(self.height)),
        ]
        if self.truth is not None:
            h.append((H_TRUTH, self.truth))
        return [(k, v.encode()) for k, v in h]

    @classmethod
    def from_headers(cls, headers: Headers | None) -> FrameMeta:
        """Parse and validate frame headers; raises WireError with a precise reason."""
        raw: dict[str, str] = {}
        for k, v in headers or []:
            try:
                raw[k] = (v or b"").decode("utf-8")
            except (UnicodeDecodeError, AttributeError) as exc:
                raise WireError("bad_header", f"header {k!r} is not UTF-8 text") from exc
        if H_SCHEMA not in raw:
            raise WireError("missing_header", f"no {H_SCHEMA} header: not a linewatch frame")
        try:
            schema = int(raw[H_SCHEMA])
        except ValueError as exc:
            raise WireError("bad_header", f"{H_SCHEMA}={raw[H_SCHEMA][:40]!r} is not an integer") from exc
        if schema not in SUPPORTED_FRAME_SCHEMAS:
            raise WireError(
                "unknown_schema",
                f"frame schema {schema} not supported (this worker reads "
                f"{sorted(SUPPORTED_FRAME_SCHEMAS)}); upgrade the worker",
            )
        missing = [h for h in REQUIRED_FRAME_HEADERS if not raw.get(h)]
        if missing:
            raise WireError("missing_header", f"missing header(s): {', '.join(missing)}")

        def as_int(name: str, lo: int, hi: int = INT64_MAX) -> int:
            text = raw[name]
            if len(text) > 20 or not text.isascii():
                raise WireError("bad_header", f"{name}={text[:40]!r} is not a 64-bit integer")
            try:
                value = int(text)
            except ValueError as exc:
                raise WireError("bad_header", f"{name}={text!r} is not an integer") from exc
            if not lo <= value <= hi:
                raise WireError("bad_header", f"{name}={value} is outside [{lo}, {hi}]")
            return value

        encoding = raw[H_ENCODING].lower()
        if encoding not in ENCODINGS:
            raise WireError("bad_header", f"{H_ENCODING}={encoding[:40]!r}; expected one of {ENCODINGS}")
        truth = raw.get(H_TRUTH) or None
        if truth is not None and truth not in ("normal", "defect"):
            raise WireError("bad_header", f"{H_TRUTH}={truth[:40]!r}; expected normal or defect")
        return cls(
            camera=raw[H_CAMERA],  # both ids are checked by __post_init__
            line=raw[H_LINE],
            seq=as_int(H_SEQ, 0),
            capture_ns=as_int(H_CAPTURE_NS, 0),
            encoding=encoding,
            width=as_int(H_WIDTH, 1, MAX_FRAME_SIDE),
            height=as_int(H_HEIGHT, 1, MAX_FRAME_SIDE),
            truth=truth,
            schema=schema,
        )


@dataclass(frozen=True)
class FrameRef:
    """Where the original frame record lives, so a reader can fetch it while retained."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"
