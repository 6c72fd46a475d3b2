"""The review service's Kafka side: ``.review`` into the store, verdicts out to ``.labels``.

Intake commits its consumer offsets only after the items are in the store, so a
crash re-reads them (and the store ignores what it already has). A record that
is not a usable review item (malformed, unknown schema, a picture over the frame
limits, refused by the database) is counted, logged once with its position and
skipped: retrying it could never succeed, and everything behind it would wait.
A database that is down is the opposite case: nothing is committed and the
batch is read again once it is back.

Verdicts leave through the store's outbox, each signed with the key workers
check (``LINEWATCH_LABEL_KEY``): sent, acknowledged by Kafka, then marked sent.
A pruning thread applies the retention period.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from linewatch.review.store import ReviewError, ReviewStore
from linewatch.wire import MESSAGE_REASONS, ReviewItem, Topics, WireError
from monitoring import metrics

log = logging.getLogger(__name__)


class ReviewBridge:
    def __init__(self, bootstrap: str, topics: Topics, store: ReviewStore, label_key: bytes,
                 group_id: str = "linewatch-review", retention_s: float | None = None,
                 prune_every_s: float = 3600.0) -> None:
        self.bootstrap, self.topics, self.store, self.group_id = bootstrap, topics, store, group_id
        self.label_key = label_key
        self.retention_s, self.prune_every_s = retention_s, prune_every_s
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._exported_at = float("-inf")
        for reason in (*MESSAGE_REASONS, "refused"):
            metrics.RECORDS_REJECTED.labels(reader="review", topic=topics.review, reason=reason)
        for state in ("labelled", "unlabelled"):
            metrics.REVIEW_PRUNED.labels(state=state)

    def start(self) -> ReviewBridge:
        targets = [(self._intake, "review-intake"), (self._outbox, "label-outbox")]
        if self.retention_s is not None:
            targets.append((self._pruner, "review-retention"))
        for target, name in targets:
            t = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self, timeout_s: float = 15.0) -> None:
        self.stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout=timeout_s)

    def _guard(self, target: Any) -> None:
        failing_since: float | None = None
        while not self.stop.is_set():
            try:
                target()
                return
            except Exception as exc:  # a broker or database outage must not end the service
                now = time.monotonic()
                if failing_since is None or now - failing_since > 60:
                    failing_since = now
                    log.exception("%s failed (%s); retrying every 2 s (logged once a minute)",
                                  threading.current_thread().name, exc)
                self.stop.wait(2.0)

    def _intake(self) -> None:
        from kafka import KafkaConsumer
        from kafka.structs import OffsetAndMetadata, TopicPartition

        consumer = KafkaConsumer(
            self.topics.review, bootstrap_servers=self.bootstrap, group_id=self.group_id,
            client_id="linewatch-review", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=10_000, heartbeat_interval_ms=2_000, fetch_max_wait_ms=200,
            max_partition_fetch_bytes=16 << 20)
        try:
            while not self.stop.is_set():
                got = consumer.poll(timeout_ms=500)
                self._export_queue()
                if not got:
                    continue
                done: dict[TopicPartition, OffsetAndMetadata] = {}
                for tp, records in got.items():
                    for rec in records:
                        self._take(rec)  # a database outage raises: nothing committed
                        done[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
                consumer.commit(done)  # only after the store has them (or they were refused)
        finally:
            consumer.close(autocommit=False)

    def _take(self, rec: Any) -> None:
        try:
            item = ReviewItem.from_bytes(rec.value)
            if self.store.add(item):
                metrics.REVIEW_RECEIVED.inc()
        except (WireError, ReviewError) as exc:
            self._refuse(rec, exc.reason if isinstance(exc, WireError) else "refused", exc)
        except (OperationalError, InterfaceError):
            raise  # the database is down: nothing is committed, the batch is read again
        except Exception as exc:  # any other fault of this record: refused, never retried
            self._refuse(rec, "bad_message", exc)

    def _refuse(self, rec: Any, reason: str, exc: BaseException) -> None:
        metrics.RECORDS_REJECTED.labels(reader="review", topic=rec.topic, reason=reason).inc()
        log.warning("skipping review record %s/%d/%d: %s: %s", rec.topic, rec.partition,
                    rec.offset, type(exc).__name__, exc)

    def _export_queue(self, every_s: float = 2.0) -> None:
        """The queue gauge, kept current whether or not anyone has the page open."""
        now = time.monotonic()
        if now - self._exported_at >= every_s:
            self._exported_at = now
            for state, n in self.store.counts().items():
                metrics.REVIEW_QUEUE.labels(state=state).set(n)

    def _outbox(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                 client_id="linewatch-review-labels", max_request_size=16 << 20,
                                 delivery_timeout_ms=30_000, request_timeout_ms=10_000)
        try:
            while not self.stop.is_set():
                self.wake.wait(1.0)
                self.wake.clear()
                labels = self.store.unsent_labels()
                if not labels:
                    continue
                futures = [(lab.item_id, producer.send(self.topics.labels, key=lab.camera.encode(),
                                                       value=lab.signed(self.label_key).to_bytes()))
                           for lab in labels]
                producer.flush(timeout=40)
                sent = [i for i, f in futures if f.is_done and f.succeeded()]
                self.store.mark_sent(sent)
                if len(sent) < len(futures):
                    log.error("%d labels not acknowledged by Kafka; retrying", len(futures) - len(sent))
                    self.stop.wait(1.0)
        finally:
            producer.close(timeout=10)

    def _pruner(self) -> None:
        assert self.retention_s is not None
        while not self.stop.is_set():
            gone = self.store.prune(self.retention_s)
            for state, n in gone.items():
                metrics.REVIEW_PRUNED.labels(state=state).inc(n)
            if any(gone.values()):
                log.info("retention: deleted %s review items older than %.1f days", gone,
                         self.retention_s / 86400)
            self.stop.wait(self.prune_every_s)
