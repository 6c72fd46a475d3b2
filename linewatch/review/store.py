"""The review queue's durable store: items, claims with leases, verdicts, an outbox,
and the operators who may sign in (with their server-side sessions).

SQLite by default (one file, survives restarts), any SQLAlchemy database URL in
production (tested on PostgreSQL; every integer that holds a sequence number or
nanoseconds is 64-bit). Three rules keep it honest:

* **Idempotent intake**: an item id is (camera, sequence number), so a frame the
  workers scored twice (at-least-once) is one item, and re-reading ``.review``
  after a restart adds nothing.
* **One operator per item**: claiming is a conditional UPDATE ("only if still
  waiting, or its lease has expired"), so two operators racing for the same
  item cannot both win, on SQLite or on a server database.
* **Verdicts are never lost**: a verdict is written here first (the outbox) and
  marked sent only after Kafka acknowledged its label; a restart re-sends what
  was not acknowledged.

Nothing grows without bound: :meth:`ReviewStore.prune` deletes items older than
the retention period (a labelled item only once its label was sent) and expired
sessions.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from linewatch.images import open_limited
from linewatch.review.passwords import (
    MIN_PASSWORD_CHARS,
    OPERATOR,
    OPERATOR_RULE,
    hash_password,
    password_matches,
    sha256_hex,
    unknown_operator_hash,
)
from linewatch.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    INT64_MAX,
    ITEM_ID_RE,
    Label,
    ReviewItem,
)

DEFECT_TYPES = ("scratch", "crack", "dent", "contamination", "missing part", "discolouration",
                "other")

metadata = MetaData()
items = Table(
    "review_items", metadata,
    Column("item_id", String(200), primary_key=True),
    Column("camera", String(200), nullable=False),
    Column("line", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("capture_ns", BigInteger, nullable=False),
    Column("decided_ns", BigInteger, nullable=False),
    Column("received_ns", BigInteger, nullable=False, index=True),
    Column("score", Float, nullable=False),
    Column("alert_threshold", Float, nullable=False),
    Column("review_threshold", Float, nullable=False),
    Column("where_text", Text, nullable=False),
    Column("explanation", Text, nullable=False),
    Column("frame_jpeg", LargeBinary, nullable=False),
    Column("overlay_jpeg", LargeBinary, nullable=False),
    Column("ref", String(300), nullable=False),
    Column("state", String(16), nullable=False, index=True),  # waiting | claimed | labelled
    Column("skips", Integer, nullable=False, default=0),
    Column("claimed_by", String(100)),
    Column("lease_until_ns", BigInteger),
    Column("verdict", String(16)),
    Column("defect_type", String(50)),
    Column("operator", String(100)),
    Column("labelled_ns", BigInteger),
    Column("label_sent", Boolean, nullable=False, default=False, index=True),
)
operators = Table(
    "review_operators", metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", String(200), nullable=False),
    Column("created_ns", BigInteger, nullable=False),
)
sessions = Table(
    "review_sessions", metadata,
    Column("token_sha256", String(64), primary_key=True),  # the token itself is never stored
    Column("operator", String(64), nullable=False, index=True),
    Column("created_ns", BigInteger, nullable=False),
    Column("expires_ns", BigInteger, nullable=False, index=True),
)


class ReviewError(RuntimeError):
    """A request the queue cannot honour; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Claim:
    item_id: str
    lease_until_ns: int


def check_item_id(item_id: str) -> str:
    """``item_id`` if it is CAMERA:SEQ by the wire contract's id rule, else a 404; checked
    before an id reaches a URL or a query (queries are parameterised regardless)."""
    m = ITEM_ID_RE.fullmatch(item_id or "")
    if not m or int(m.group(2)) > INT64_MAX:
        raise ReviewError(404, "no such item")
    return item_id


class ReviewStore:
    def __init__(self, url: str, lease_s: float = 120.0,
                 max_image_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        """``max_image_*``: the frame limits, applied to the pictures inside review items."""
        self.url = url
        self.lease_ns = int(lease_s * 1e9)
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")   # readers do not block the writer
                cur.execute("PRAGMA synchronous=FULL")   # a verdict survives power loss
                cur.execute("PRAGMA busy_timeout=10000")
                cur.close()
        metadata.create_all(self.engine)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- intake ------------------------------------------------------------------------------
    def _image(self, b64: str, what: str) -> bytes:
        try:
            data = base64.b64decode(b64, validate=True)
            _im, fmt = open_limited(data, self.max_image_bytes, self.max_image_pixels)
        except (binascii.Error, ValueError) as exc:  # WireError is a ValueError
            raise ReviewError(422, f"{what}: {exc}") from None
        if fmt != "jpeg":
            raise ReviewError(422, f"{what} is {fmt}, not JPEG")
        return data

    def add(self, item: ReviewItem) -> bool:
        """Store a review item; False when it was already there (a re-delivery). A
        ReviewError (422) says the item itself is unusable: skip it, retrying cannot help."""
        check_item_id(item.item_id)
        if item.item_id != f"{item.camera}:{item.seq}":
            raise ReviewError(422, f"item id {item.item_id!r} does not match its camera and seq")
        frame = self._image(item.frame_jpeg_b64, "frame")
        over = self._image(item.overlay_jpeg_b64, "overlay")
        row = {
            "item_id": item.item_id, "camera": item.camera, "line": item.line, "seq": item.seq,
            "capture_ns": item.capture_ns, "decided_ns": item.decided_ns,
            "received_ns": time.time_ns(), "score": item.score,
            "alert_threshold": item.alert_threshold, "review_threshold": item.review_threshold,
            "where_text": item.where, "explanation": item.explanation,
            "frame_jpeg": frame,
            "overlay_jpeg": over,
            "ref": f"{item.ref.topic}/{item.ref.partition}/{item.ref.offset}",
            "state": "waiting", "skips": 0, "label_sent": False,
        }
        try:
            with self._tx() as c:
                c.execute(insert(items).values(**row))
            return True
        except IntegrityError:
            return False
        except DataError as exc:  # a value the database refuses; not worth retrying
            raise ReviewError(422, f"the database refused the item: {exc.orig}") from None

    # -- claims ------------------------------------------------------------------------------
    def _claimable(self, now: int) -> Any:
        return or_(items.c.state == "waiting",
                   (items.c.state == "claimed") & (items.c.lease_until_ns < now))

    def claim_next(self, operator: str) -> Claim | None:
        """Give ``operator`` the oldest claimable item (least skipped first), or None."""
        for _ in range(20):  # lose a race -> try the next candidate
            now = time.time_ns()
            with self._tx() as c:
                mine = c.execute(select(items.c.item_id, items.c.lease_until_ns).where(
                    (items.c.state == "claimed") & (items.c.claimed_by == operator)
                    & (items.c.lease_until_ns >= now))).first()
                if mine is not None:  # a reload of the page gets the same item back
                    return Claim(mine.item_id, mine.lease_until_ns)
                cand = c.execute(select(items.c.item_id).where(self._claimable(now))
                                 .order_by(items.c.skips, items.c.decided_ns).limit(1)).first()
                if cand is None:
                    return None
                until = now + self.lease_ns
                won = c.execute(update(items).where((items.c.item_id == cand.item_id)
                                                    & self._claimable(now))
                                .values(state="claimed", claimed_by=operator, lease_until_ns=until))
                if won.rowcount == 1:
                    return Claim(cand.item_id, until)
        return None

    def _owned(self, c: Connection, item_id: str, operator: str, now: int) -> Any:
        row = c.execute(select(items).where(items.c.item_id == item_id)).first()
        if row is None:
            raise ReviewError(404, "no such item")
        if row.state == "labelled":
            raise ReviewError(409, f"already labelled {row.verdict!r} by {row.operator}")
        if row.state != "claimed" or row.claimed_by != operator or row.lease_until_ns < now:
            raise ReviewError(409, "this item is not claimed by you (its lease may have expired); "
                                   "take the next item")
        return row

    def label(self, item_id: str, operator: str, verdict: str, defect_type: str | None = None) -> None:
        """Record a verdict on an item ``operator`` holds; the label goes out via the outbox."""
        check_item_id(item_id)
        if verdict not in ("normal", "defect"):
            raise ReviewError(400, f"verdict must be normal or defect, not {verdict!r}")
        if verdict == "defect" and defect_type is not None and defect_type not in DEFECT_TYPES:
            raise ReviewError(400, f"defect type must be one of {', '.join(DEFECT_TYPES)}")
        now = time.time_ns()
        with self._tx() as c:
            self._owned(c, item_id, operator, now)
            done = c.execute(update(items).where((items.c.item_id == item_id)
                                                 & (items.c.claimed_by == operator)
                                                 & (items.c.state == "claimed"))
                             .values(state="labelled", verdict=verdict, operator=operator,
                                     defect_type=defect_type if verdict == "defect" else None,
                                     labelled_ns=now, label_sent=False, lease_until_ns=None))
            if done.rowcount != 1:
                raise ReviewError(409, "the item changed hands while labelling; take the next item")

    def skip(self, item_id: str, operator: str) -> None:
        """Give the item back to the queue (others see it before this operator sees it again)."""
        check_item_id(item_id)
        now = time.time_ns()
        with self._tx() as c:
            row = self._owned(c, item_id, operator, now)
            c.execute(update(items).where(items.c.item_id == item_id)
                      .values(state="waiting", claimed_by=None, lease_until_ns=None,
                              skips=row.skips + 1))

    # -- reads -------------------------------------------------------------------------------
    def item(self, item_id: str) -> dict[str, Any]:
        check_item_id(item_id)
        with self.engine.connect() as c:
            row = c.execute(select(items).where(items.c.item_id == item_id)).first()
        if row is None:
            raise ReviewError(404, "no such item")
        return dict(row._mapping)

    def image(self, item_id: str, which: str) -> bytes:
        if which not in ("frame", "overlay"):
            raise ReviewError(404, "no such image")
        return self.item(item_id)[f"{which}_jpeg"]

    def counts(self) -> dict[str, int]:
        now = time.time_ns()
        out = {"waiting": 0, "claimed": 0, "labelled": 0}
        with self.engine.connect() as c:
            for state, n in c.execute(select(items.c.state, func.count()).group_by(items.c.state)):
                out[state] = n
            expired = c.execute(select(func.count()).where(
                (items.c.state == "claimed") & (items.c.lease_until_ns < now))).scalar_one()
        out["waiting"] += expired  # an expired lease is waiting again
        out["claimed"] -= expired
        return out

    def waiting(self, limit: int = 50) -> list[dict[str, Any]]:
        now = time.time_ns()
        cols = [items.c.item_id, items.c.camera, items.c.line, items.c.score, items.c.decided_ns]
        with self.engine.connect() as c:
            rows = c.execute(select(*cols).where(self._claimable(now))
                             .order_by(items.c.skips, items.c.decided_ns).limit(limit))
            return [dict(r._mapping) for r in rows]

    # -- outbox ------------------------------------------------------------------------------
    def unsent_labels(self, limit: int = 100) -> list[Label]:
        with self.engine.connect() as c:
            rows = c.execute(select(items).where((items.c.state == "labelled")
                                                 & (items.c.label_sent == False))  # noqa: E712
                             .order_by(items.c.labelled_ns).limit(limit)).all()
        return [Label(item_id=r.item_id, camera=r.camera, line=r.line, seq=r.seq, verdict=r.verdict,
                      operator=r.operator, decided_ns=r.labelled_ns, defect_type=r.defect_type,
                      score=r.score,
                      frame_jpeg_b64=(base64.b64encode(r.frame_jpeg).decode()
                                      if r.verdict == "normal" else None))
                for r in rows]

    def mark_sent(self, item_ids: list[str]) -> None:
        if item_ids:
            with self._tx() as c:
                c.execute(update(items).where(items.c.item_id.in_(item_ids)).values(label_sent=True))

    # -- operators and sessions --------------------------------------------------------------
    def add_operator(self, name: str, password: str) -> None:
        """Create an operator, or set a new password for an existing one (ends their sessions)."""
        if not OPERATOR.fullmatch(name or ""):
            raise ReviewError(400, f"operator name {name!r}: {OPERATOR_RULE}")
        if len(password) < MIN_PASSWORD_CHARS:
            raise ReviewError(400, f"a password needs at least {MIN_PASSWORD_CHARS} characters")
        hashed = hash_password(password)
        with self._tx() as c:
            done = c.execute(update(operators).where(operators.c.name == name)
                             .values(password_hash=hashed))
            if done.rowcount == 0:
                c.execute(insert(operators).values(name=name, password_hash=hashed,
                                                   created_ns=time.time_ns()))
            c.execute(delete(sessions).where(sessions.c.operator == name))

    def remove_operator(self, name: str) -> bool:
        with self._tx() as c:
            c.execute(delete(sessions).where(sessions.c.operator == name))
            return c.execute(delete(operators).where(operators.c.name == name)).rowcount == 1

    def operators(self) -> list[str]:
        with self.engine.connect() as c:
            return [r.name for r in c.execute(select(operators.c.name).order_by(operators.c.name))]

    def check_password(self, name: str, password: str) -> bool:
        """Whether ``name`` signs in with ``password`` (as slow for unknown names as for known)."""
        with self.engine.connect() as c:
            row = c.execute(select(operators.c.password_hash).where(operators.c.name == name)).first()
        stored = row.password_hash if row is not None else unknown_operator_hash()
        return password_matches(password, stored) and row is not None

    def create_session(self, name: str, ttl_s: float) -> str:
        """A new random session token for ``name``; only its hash is stored."""
        token = secrets.token_urlsafe(32)
        now = time.time_ns()
        with self._tx() as c:
            c.execute(insert(sessions).values(token_sha256=sha256_hex(token), operator=name,
                                              created_ns=now, expires_ns=now + int(ttl_s * 1e9)))
        return token

    def session_operator(self, token: str) -> str | None:
        """The operator a live session token belongs to, or None."""
        if not token or len(token) > 200:
            return None
        with self.engine.connect() as c:
            row = c.execute(select(sessions.c.operator).where(
                (sessions.c.token_sha256 == sha256_hex(token))
                & (sessions.c.expires_ns > time.time_ns()))).first()
        return None if row is None else row.operator

    def end_session(self, token: str) -> None:
        with self._tx() as c:
            c.execute(delete(sessions).where(sessions.c.token_sha256 == sha256_hex(token)))

    # -- retention ---------------------------------------------------------------------------
    def prune(self, retention_s: float) -> dict[str, int]:
        """Delete items older than ``retention_s`` (labelled ones only once their label was
        sent) and expired sessions; how many items of each state went."""
        now = time.time_ns()
        cutoff = now - int(retention_s * 1e9)
        out: dict[str, int] = {}
        with self._tx() as c:
            done = c.execute(delete(items).where((items.c.state == "labelled")
                                                 & (items.c.label_sent == True)  # noqa: E712
                                                 & (items.c.labelled_ns < cutoff)))
            out["labelled"] = done.rowcount
            done = c.execute(delete(items).where((items.c.state != "labelled")
                                                 & (items.c.received_ns < cutoff)))
            out["unlabelled"] = done.rowcount
            c.execute(delete(sessions).where(sessions.c.expires_ns <= now))
        return out
