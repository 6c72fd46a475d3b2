"""The wire contract: every message linewatch puts on Kafka, defined once.

Producers, workers, the review service and the tests all import this module;
nothing else builds or parses a linewatch message.

Frames carry the raw encoded image as the record value (no base64, no JSON
envelope: a 2 MP JPEG stays a 2 MP JPEG) and their metadata as record headers,
keyed by camera id so one camera's frames stay ordered on one partition.
Everything a worker emits is a small JSON document with a ``schema`` field.

Versioning: each message kind has an integer schema version. A reader accepts
exactly the versions it knows (``SUPPORTED_*``); anything else is not guessed
at but rejected with :class:`WireError` (reason ``unknown_schema``) so the
worker dead-letters it instead of mis-reading it. Adding an optional field does
not bump the version; changing a field's meaning or removing one does.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

FRAME_SCHEMA = 1
RESULT_SCHEMA = 1  # scores, alerts, review items, labels, dead letters
SUPPORTED_FRAME_SCHEMAS = frozenset({FRAME_SCHEMA})
SUPPORTED_RESULT_SCHEMAS = frozenset({RESULT_SCHEMA})

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

# Dead-letter headers, added to the original frame's headers.
H_DL_REASON = "lw-dl-reason"
H_DL_DETAIL = "lw-dl-detail"
H_DL_SOURCE = "lw-dl-source"  # "topic/partition/offset" of the original record
H_DL_TRUNCATED = "lw-dl-truncated"  # original value length, when the copy was cut short
H_DL_WORKER = "lw-dl-worker"

# Reasons a frame can be dead-lettered (bounded set: they become a metric label).
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
    "scoring_failed",
)


class WireError(ValueError):
    """A message does not follow the contract; ``reason`` is one of DL_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DL_REASONS:
            raise AssertionError(f"unknown dead-letter reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
            except UnicodeDecodeError as exc:
                raise WireError("bad_header", f"header {k!r} is not UTF-8") from exc
        if H_SCHEMA not in raw:
            raise WireError("missing_header", f"no {H_SCHEMA} header: not a linewatch frame")
        try:
            schema = int(raw[H_SCHEMA])
        except ValueError as exc:
            raise WireError("bad_header", f"{H_SCHEMA}={raw[H_SCHEMA]!r} is not an integer") from exc
        if schema not in SUPPORTED_FRAME_SCHEMAS:
            raise WireError(
                "unknown_schema",
                f"frame schema {schema} not supported (this worker reads "
                f"{sorted(SUPPORTED_FRAME_SCHEMAS)}); upgrade the worker",
            )
        missing = [h for h in REQUIRED_FRAME_HEADERS if not raw.get(h)]
        if missing:
            raise WireError("missing_header", f"missing header(s): {', '.join(missing)}")

        def as_int(name: str, lo: int) -> int:
            try:
                value = int(raw[name])
            except ValueError as exc:
                raise WireError("bad_header", f"{name}={raw[name]!r} is not an integer") from exc
            if value < lo:
                raise WireError("bad_header", f"{name}={value} is below {lo}")
            return value

        encoding = raw[H_ENCODING].lower()
        if encoding not in ENCODINGS:
            raise WireError("bad_header", f"{H_ENCODING}={encoding!r}; expected one of {ENCODINGS}")
        truth = raw.get(H_TRUTH) or None
        if truth is not None and truth not in ("normal", "defect"):
            raise WireError("bad_header", f"{H_TRUTH}={truth!r}; expected normal or defect")
        return cls(
            camera=raw[H_CAMERA],
            line=raw[H_LINE],
            seq=as_int(H_SEQ, 0),
            capture_ns=as_int(H_CAPTURE_NS, 0),
            encoding=encoding,
            width=as_int(H_WIDTH, 1),
            height=as_int(H_HEIGHT, 1),
            truth=truth,
            schema=schema,
        )


def headers_dict(headers: Headers | None) -> dict[str, str]:
    """Headers as text, for logs and dead-letter inspection (bad bytes replaced)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers or []}


@dataclass(frozen=True)
class FrameRef:
    """Where the original frame record lives, so a reader can fetch it while retained."""

    topic: str
    partition: int
    offset: int


class _JsonMessage:
    """Shared JSON encoding for result messages; subclasses are frozen dataclasses."""

    kind: ClassVar[str]

    def to_bytes(self) -> bytes:
        d = asdict(self)  # type: ignore[call-overload]
        d["kind"] = self.kind
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError("bad_header", f"{cls.kind} message is not JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise WireError("bad_header", f"{cls.kind} message is not a JSON object")
        if d.get("schema") not in SUPPORTED_RESULT_SCHEMAS:
            raise WireError("unknown_schema", f"{cls.kind} schema {d.get('schema')!r} not supported")
        if d.pop("kind", cls.kind) != cls.kind:
            raise WireError("bad_header", f"expected a {cls.kind} message")
        if "ref" in d and isinstance(d["ref"], dict):
            d["ref"] = FrameRef(**d["ref"])
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Score(_JsonMessage):
    """Every scored frame's outcome, on ``.scores``."""

    kind: ClassVar[str] = "score"
    camera: str
    line: str
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    decision: str  # "normal" | "review" | "alert"
    alert_threshold: float
    review_threshold: float
    scorer: str
    worker: str
    ref: FrameRef
    truth: str | None = None
    schema: int = RESULT_SCHEMA

    @property
    def latency_s(self) -> float:
        return (self.decided_ns - self.capture_ns) / 1e9


@dataclass(frozen=True)
class Region:
    """A suspicious region in frame pixel coordinates (x0, y0, x1, y1)."""

    box: tuple[int, int, int, int]
    peak: float


@dataclass(frozen=True)
class Alert(_JsonMessage):
    """A frame at or above the alert threshold, on ``.alerts``."""

    kind: ClassVar[str] = "alert"
    camera: str
    line: str
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    alert_threshold: float
    where: str
    boxes: list[list[int]]
    ref: FrameRef
    words: str | None = None  # best-matching defect words, only when a CLIP text model is configured
    schema: int = RESULT_SCHEMA


@dataclass(frozen=True)
class ReviewItem(_JsonMessage):
    """A borderline frame for a person, on ``.review``.

    Carries a downscaled copy of the frame and its heatmap overlay (JPEG, base64)
    so the review page never needs the frames topic to still hold the original.
    """

    kind: ClassVar[str] = "review"
    item_id: str
    camera: str
    line: str
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    alert_threshold: float
    review_threshold: float
    where: str
    explanation: str
    frame_jpeg_b64: str
    overlay_jpeg_b64: str
    ref: FrameRef
    schema: int = RESULT_SCHEMA


VERDICTS = ("normal", "defect", "skip")


@dataclass(frozen=True)
class Label(_JsonMessage):
    """An operator's verdict on a review item, on ``.labels`` (keyed by camera)."""

    kind: ClassVar[str] = "label"
    item_id: str
    camera: str
    line: str
    seq: int
    verdict: str
    operator: str
    decided_ns: int = field(default_factory=time.time_ns)
    defect_type: str | None = None
    score: float | None = None  # the score the worker gave the frame
    # the review item's frame (JPEG, base64) on "normal" verdicts, so workers can add it to
    # their reference memory without the frames topic still holding the original
    frame_jpeg_b64: str | None = None
    schema: int = RESULT_SCHEMA

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise WireError("bad_header", f"verdict {self.verdict!r}; expected one of {VERDICTS}")


def review_item_id(camera: str, seq: int) -> str:
    """Stable review item id: the same frame scored twice gives the same item."""
    return f"{camera}:{seq}"
