"""The JSON messages: scores, alerts, review items and operators' labels.

One parsing path for all of them (:meth:`_JsonMessage.from_bytes`): the size is
checked before JSON is parsed, then every field against its declared type and
limits (64-bit integers, finite floats, bounded strings, the id rule), so a
malformed record of any kind becomes a :class:`WireError` with reason
``bad_message`` and never a ``TypeError`` deep inside a reader. Fields a reader
does not know are ignored (adding an optional field does not bump the schema).

Labels change what every worker believes is normal, so they are signed: an
HMAC-SHA256 over the canonical JSON of every other field, with a key the review
service and the workers share (``LINEWATCH_LABEL_KEY``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from linewatch.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    ID_PATTERN,
    ID_RE,
    INT64_MAX,
    MAX_FRAME_SIDE,
    FrameRef,
    WireError,
)

RESULT_SCHEMA = 1  # scores, alerts, review items, labels
SUPPORTED_RESULT_SCHEMAS = frozenset({RESULT_SCHEMA})

# A result message is small JSON; a review item or label carries at most two downscaled JPEGs.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_B64 = (DEFAULT_MAX_FRAME_BYTES + 2) // 3 * 4
MAX_BOXES = 64

ITEM_ID_RE = re.compile(rf"({ID_PATTERN}):([0-9]{{1,19}})")

LABEL_KEY_ENV = "LINEWATCH_LABEL_KEY"
MIN_LABEL_KEY_CHARS = 16

# field metadata: the limits a field's value must keep
_ID = {"rule": "id"}
_ITEM = {"rule": "item"}
_NAME = {"max_len": 200}
_TEXT = {"max_len": 4000}
_B64 = {"max_len": MAX_IMAGE_B64, "b64": True}
_SIG = {"max_len": 64, "hex": True}
_B64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX = re.compile(r"[0-9a-f]{64}")


def _bad(kind: str, msg: str) -> WireError:
    return WireError("bad_message", f"{kind}: {msg}")


def _check_str(kind: str, name: str, value: Any, meta: dict[str, Any]) -> str:
    if not isinstance(value, str):
        raise _bad(kind, f"{name} must be a string, not {type(value).__name__}")
    if len(value) > meta.get("max_len", 200):
        raise _bad(kind, f"{name} is {len(value)} characters, over {meta.get('max_len', 200)}")
    rule = meta.get("rule")
    if rule == "id" and not ID_RE.fullmatch(value):
        raise _bad(kind, f"{name} {value[:80]!r} is not a valid camera/line id")
    if rule == "item":
        m = ITEM_ID_RE.fullmatch(value)
        if not m or int(m.group(2)) > INT64_MAX:
            raise _bad(kind, f"{name} {value[:80]!r} is not CAMERA:SEQ")
    if meta.get("b64") and not _B64_CHARS.fullmatch(value):
        raise _bad(kind, f"{name} is not base64")
    if meta.get("hex") and not _HEX.fullmatch(value):
        raise _bad(kind, f"{name} is not a hex SHA-256 digest")
    return value


def _check_int(kind: str, name: str, value: Any, lo: int = 0, hi: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(kind, f"{name} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(kind, f"{name}={value} is outside [{lo}, {hi}]")
    return value


def _check_value(kind: str, name: str, tp: Any, value: Any, meta: dict[str, Any]) -> Any:
    """``value`` checked against the annotation ``tp`` (the few types messages use)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(kind, f"{name} must be true or false")
        return value
    if tp is int:
        return _check_int(kind, name, value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _bad(kind, f"{name} must be a finite number")
        return float(value)
    if tp is str:
        return _check_str(kind, name, value, meta)
    if tp is FrameRef:
        if not isinstance(value, dict):
            raise _bad(kind, f"{name} must be an object")
        return FrameRef(_check_str(kind, f"{name}.topic", value.get("topic"), {"max_len": 249}),
                        _check_int(kind, f"{name}.partition", value.get("partition"), 0, 2**31 - 1),
                        _check_int(kind, f"{name}.offset", value.get("offset")))
    if tp == list[list[int]]:  # boxes: [[x0, y0, x1, y1], ...]
        if not isinstance(value, list) or len(value) > MAX_BOXES:
            raise _bad(kind, f"{name} must be a list of at most {MAX_BOXES} boxes")
        for box in value:
            if not isinstance(box, list) or len(box) != 4:
                raise _bad(kind, f"{name} holds something that is not [x0, y0, x1, y1]")
            for c in box:
                _check_int(kind, name, c, 0, MAX_FRAME_SIDE)
        return value
    raise AssertionError(f"no check for {tp!r}")  # a new field type needs a check here


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


class _JsonMessage:
    """Shared encoding and the one parsing path; subclasses are frozen dataclasses."""

    kind: ClassVar[str]
    _hints: ClassVar[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["kind"] = self.kind
        return d

    def to_bytes(self) -> bytes:
        return _canonical(self.to_dict())

    @classmethod
    def _load(cls, data: bytes | None) -> dict[str, Any]:
        if not isinstance(data, bytes | bytearray) or not data:
            raise _bad(cls.kind, "empty record")
        if len(data) > MAX_MESSAGE_BYTES:
            raise _bad(cls.kind, f"{len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte message limit")
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise _bad(cls.kind, f"not JSON: {str(exc)[:200]}") from exc
        if not isinstance(d, dict):
            raise _bad(cls.kind, "not a JSON object")
        schema = d.get("schema")
        if type(schema) is not int or schema not in SUPPORTED_RESULT_SCHEMAS:
            raise WireError("unknown_schema",
                            f"{cls.kind} schema {str(d.get('schema'))[:20]!r} not supported "
                            f"(this reader knows {sorted(SUPPORTED_RESULT_SCHEMAS)})")
        if d.get("kind", cls.kind) != cls.kind:
            raise _bad(cls.kind, f"a {str(d.get('kind'))[:20]!r} message, not a {cls.kind}")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        hints = cls.__dict__.get("_hints")
        if hints is None:
            hints = typing.get_type_hints(cls)
            cls._hints = hints
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise _bad(cls.kind, f"missing field {f.name!r}")
                continue
            values[f.name] = _check_value(cls.kind, f.name, hints[f.name], d[f.name], dict(f.metadata))
        return cls(**values)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> Any:
        """Parse one record; any malformation is a WireError (never another exception)."""
        return cls.from_dict(cls._load(data))


@dataclass(frozen=True)
class Score(_JsonMessage):
    """Every scored frame's outcome, on ``.scores``."""

    kind: ClassVar[str] = "score"
    camera: str = field(metadata=_ID)
    line: str = field(metadata=_ID)
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    decision: str = field(metadata={"max_len": 16})  # "normal" | "review" | "alert"
    alert_threshold: float
    review_threshold: float
    scorer: str = field(metadata=_NAME)
    worker: str = field(metadata=_NAME)
    ref: FrameRef
    truth: str | None = field(default=None, metadata={"max_len": 16})
    # set when this frame's partition changed owner just before it was read and it lies
    # within one batch of the committed offset: a previous owner may have scored it already
    maybe_duplicate: bool = False
    # zero-shot (mutual) scorers: how the frame was scored ("warm-up": its camera had too few
    # frames, and it went to review; "mutual"; "few-shot"), and whether the thresholds that
    # decided it were calibrated on normal frames
    mode: str | None = field(default=None, metadata={"max_len": 16})
    calibrated: bool = True
    schema: int = RESULT_SCHEMA

    @property
    def latency_s(self) -> float:
        return (self.decided_ns - self.capture_ns) / 1e9


@dataclass(frozen=True)
class Alert(_JsonMessage):
    """A frame at or above the alert threshold, on ``.alerts``."""

    kind: ClassVar[str] = "alert"
    camera: str = field(metadata=_ID)
    line: str = field(metadata=_ID)
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    alert_threshold: float
    where: str = field(metadata=_TEXT)
    boxes: list[list[int]]
    ref: FrameRef
    words: str | None = field(default=None, metadata=_TEXT)  # defect words, with a CLIP text model
    schema: int = RESULT_SCHEMA


@dataclass(frozen=True)
class ReviewItem(_JsonMessage):
    """A borderline frame for a person, on ``.review``.

    Carries a downscaled copy of the frame and its heatmap overlay (JPEG, base64)
    so the review page never needs the frames topic to still hold the original.
    """

    kind: ClassVar[str] = "review"
    item_id: str = field(metadata=_ITEM)
    camera: str = field(metadata=_ID)
    line: str = field(metadata=_ID)
    seq: int
    capture_ns: int
    decided_ns: int
    score: float
    alert_threshold: float
    review_threshold: float
    where: str = field(metadata=_TEXT)
    explanation: str = field(metadata=_TEXT)
    frame_jpeg_b64: str = field(metadata=_B64)
    overlay_jpeg_b64: str = field(metadata=_B64)
    ref: FrameRef
    schema: int = RESULT_SCHEMA


VERDICTS = ("normal", "defect", "skip")


def label_key(environ: typing.Mapping[str, str] | None = None) -> bytes | None:
    """The shared label-signing key from ``LINEWATCH_LABEL_KEY``, or None when unset."""
    value = (os.environ if environ is None else environ).get(LABEL_KEY_ENV, "")
    if not value:
        return None
    if len(value) < MIN_LABEL_KEY_CHARS:
        raise ValueError(f"{LABEL_KEY_ENV} must be at least {MIN_LABEL_KEY_CHARS} characters "
                         "(e.g. `openssl rand -hex 32`)")
    return value.encode()


def _mac(key: bytes, unsigned: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(unsigned), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Label(_JsonMessage):
    """An operator's verdict on a review item, on ``.labels`` (keyed by camera), signed."""

    kind: ClassVar[str] = "label"
    item_id: str = field(metadata=_ITEM)
    camera: str = field(metadata=_ID)
    line: str = field(metadata=_ID)
    seq: int
    verdict: str = field(metadata={"max_len": 16})
    operator: str = field(metadata={"max_len": 64})
    decided_ns: int = field(default_factory=time.time_ns)
    defect_type: str | None = field(default=None, metadata={"max_len": 50})
    score: float | None = None  # the score the worker gave the frame
    # the review item's frame (JPEG, base64) on "normal" verdicts, so workers can add it to
    # their reference memory without the frames topic still holding the original
    frame_jpeg_b64: str | None = field(default=None, metadata=_B64)
    sig: str | None = field(default=None, metadata=_SIG)  # HMAC-SHA256 of every other field
    schema: int = RESULT_SCHEMA

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise _bad("label", f"verdict {self.verdict[:20]!r}; expected one of {VERDICTS}")

    def signed(self, key: bytes) -> Label:
        """This label with its signature (the review service signs every label it sends)."""
        unsigned = self.to_dict()
        unsigned.pop("sig")
        return replace(self, sig=_mac(key, unsigned))

    @classmethod
    def from_signed_bytes(cls, data: bytes | None, key: bytes) -> Label:
        """Parse a label and check its signature: reasons ``unsigned`` and ``bad_signature``
        (forged or altered), besides the malformations every message is checked for."""
        d = cls._load(data)
        sig = d.pop("sig", None)
        if not sig:
            raise WireError("unsigned", "label carries no signature; only the review service's "
                                        "signed labels are applied")
        if not isinstance(sig, str) or not _HEX.fullmatch(sig) or not hmac.compare_digest(sig, _mac(key, d)):
            raise WireError("bad_signature", "label signature does not match (forged or altered, "
                                             f"or signed with another {LABEL_KEY_ENV})")
        d["sig"] = sig
        return cls.from_dict(d)


def review_item_id(camera: str, seq: int) -> str:
    """Stable review item id: the same frame scored twice gives the same item."""
    return f"{camera}:{seq}"
