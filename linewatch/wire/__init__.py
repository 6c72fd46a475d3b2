"""The wire contract: every message linewatch puts on Kafka, defined once.

Producers, workers, the review service, the tally and the tests all import this
package; nothing else builds or parses a linewatch message.

* **Frames** (:mod:`.frames`) carry the raw encoded image as the record value
  (no base64, no JSON envelope: a 2 MP JPEG stays a 2 MP JPEG) and their
  metadata as record headers, keyed by camera id so one camera's frames stay
  ordered on one partition.
* **Scores, alerts, review items, labels** (:mod:`.messages`) are small JSON
  documents with a ``schema`` field, parsed by one strict path; labels are signed.
* **Dead letters** (:mod:`.deadletter`) are the original record plus ``lw-dl-*``
  headers saying why.

Versioning: each message kind has an integer schema version. A reader accepts
exactly the versions it knows; anything else is not guessed at but rejected
with :class:`WireError` (reason ``unknown_schema``). Adding an optional field
does not bump the version; changing a field's meaning or removing one does.
"""

from linewatch.wire.deadletter import (
    H_DL_DETAIL,
    H_DL_REASON,
    H_DL_SOURCE,
    H_DL_TRUNCATED,
    H_DL_WORKER,
    DeadLetter,
    dead_letter_record,
    parse_dead_letter,
    without_payload,
)
from linewatch.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    DEFAULT_TOPIC_PREFIX,
    DL_FAILURE_REASONS,
    DL_REASONS,
    ENCODINGS,
    FRAME_SCHEMA,
    H_CAMERA,
    H_CAPTURE_NS,
    H_ENCODING,
    H_HEIGHT,
    H_LINE,
    H_SCHEMA,
    H_SEQ,
    H_TRUTH,
    H_WIDTH,
    ID_RE,
    ID_RULE,
    INT64_MAX,
    MESSAGE_REASONS,
    REQUIRED_FRAME_HEADERS,
    SUPPORTED_FRAME_SCHEMAS,
    TOPIC_KINDS,
    FrameMeta,
    FrameRef,
    Headers,
    Topics,
    WireError,
    check_id,
    dead_letter_cause,
    headers_dict,
)
from linewatch.wire.messages import (
    ITEM_ID_RE,
    LABEL_KEY_ENV,
    MAX_MESSAGE_BYTES,
    RESULT_SCHEMA,
    SUPPORTED_RESULT_SCHEMAS,
    VERDICTS,
    Alert,
    Label,
    ReviewItem,
    Score,
    label_key,
    review_item_id,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "DEFAULT_MAX_FRAME_PIXELS", "DEFAULT_TOPIC_PREFIX",
    "DL_FAILURE_REASONS", "DL_REASONS", "ENCODINGS", "FRAME_SCHEMA", "H_CAMERA", "H_CAPTURE_NS",
    "H_DL_DETAIL", "H_DL_REASON", "H_DL_SOURCE", "H_DL_TRUNCATED", "H_DL_WORKER", "H_ENCODING",
    "H_HEIGHT", "H_LINE", "H_SCHEMA", "H_SEQ", "H_TRUTH", "H_WIDTH", "ID_RE", "ID_RULE", "INT64_MAX",
    "ITEM_ID_RE", "LABEL_KEY_ENV", "MAX_MESSAGE_BYTES", "MESSAGE_REASONS", "REQUIRED_FRAME_HEADERS",
    "RESULT_SCHEMA", "SUPPORTED_FRAME_SCHEMAS", "SUPPORTED_RESULT_SCHEMAS", "TOPIC_KINDS", "VERDICTS",
    "Alert", "DeadLetter", "FrameMeta", "FrameRef", "Headers", "Label", "ReviewItem",
    "Score", "Topics", "WireError", "check_id", "dead_letter_cause", "dead_letter_record",
    "headers_dict", "label_key", "parse_dead_letter", "review_item_id", "without_payload",
]
