"""The review service's Kafka side: ``.review`` into the store, verdicts out to ``.labels``.

Intake commits its consumer offsets only after the items are in the store, so a
crash re-reads them (and the store ignores what it already has). Verdicts leave
through the store's outbox: sent, acknowledged by Kafka, then marked sent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from linewatch.review.store import ReviewError, ReviewStore
from linewatch.wire import ReviewItem, Topics, WireError
from monitoring import metrics

log = logging.getLogger(__name__)


class ReviewBridge:
    def __init__(self, bootstrap: str, topics: Topics, store: ReviewStore,
                 group_id: str = "linewatch-review") -> None:
        self.bootstrap, self.topics, self.store, self.group_id = bootstrap, topics, store, group_id
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._exported_at = float("-inf")

    def start(self) -> ReviewBridge:
        for target, name in ((self._intake, "review-intake"), (self._outbox, "label-outbox")):
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
        while not self.stop.is_set():
            try:
                target()
                return
            except Exception:  # a broker outage must not end the service; retry
                log.exception("%s failed; retrying in 2 s", threading.current_thread().name)
                self.stop.wait(2.0)

    def _intake(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.topics.review, bootstrap_servers=self.bootstrap, group_id=self.group_id,
            client_id="linewatch-review", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=10_000, heartbeat_interval_ms=2_000, fetch_max_wait_ms=200)
        try:
            while not self.stop.is_set():
                got = consumer.poll(timeout_ms=500)
                self._export_queue()
                if not got:
                    continue
                for records in got.values():
                    for rec in records:
                        try:
                            item = ReviewItem.from_bytes(rec.value)
                            if self.store.add(item):
                                metrics.REVIEW_RECEIVED.inc()
                        except (WireError, ReviewError, ValueError) as exc:
                            log.warning("skipping review record %s/%d/%d: %s", rec.topic,
                                        rec.partition, rec.offset, exc)
                consumer.commit()  # only after the store has them
        finally:
            consumer.close(autocommit=False)

    def _export_queue(self, every_s: float = 2.0) -> None:
        """The queue gauge, kept current whether or not anyone has the page open."""
        now = time.monotonic()
        if now - self._exported_at >= every_s:
            self._exported_at = now
            for state, n in self.store.counts().items():
                metrics.REVIEW_QUEUE.labels(state=state).set(n)

    def _outbox(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", retries=5,
                                 client_id="linewatch-review-labels", max_request_size=8 * 1024 * 1024)
        try:
            while not self.stop.is_set():
                self.wake.wait(1.0)
                self.wake.clear()
                labels = self.store.unsent_labels()
                if not labels:
                    continue
                futures = [(lab.item_id, producer.send(self.topics.labels, key=lab.camera.encode(),
                                                       value=lab.to_bytes())) for lab in labels]
                producer.flush(timeout=30)
                sent = [i for i, f in futures if f.is_done and f.succeeded()]
                self.store.mark_sent(sent)
                if len(sent) < len(futures):
                    log.error("%d labels not acknowledged by Kafka; retrying", len(futures) - len(sent))
                    self.stop.wait(1.0)
        finally:
            producer.close(timeout=10)
