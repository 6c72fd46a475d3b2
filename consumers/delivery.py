"""Delivering a batch's outputs: send, flush, and check every acknowledgement.

Each output that Kafka did not acknowledge gets a named outcome:

* **retriable** (timeouts, a leader moving, the broker restarting, a topic with
  no metadata yet): returned to the caller, which retries after a pause; only
  the failed outputs are sent again, never an acknowledged one;
* **too large** (refused by the client's or the broker's size limit): its
  ``fallback`` (a smaller form, e.g. a review item with smaller pictures, a dead
  letter without its copy of the frame) is sent instead; an output with no
  fallback, or whose fallback is refused too, is dropped, logged and counted
  (``linewatch_outputs_dropped_total``), since no retry can ever deliver it;
* **refused** (not authorised, invalid topic): returned like a retriable one,
  since it is a configuration error that is not the frames' fault; the caller
  keeps the batch uncommitted and says what to fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.routing import Outbound
from monitoring import metrics

log = logging.getLogger(__name__)


@dataclass
class Undelivered:
    """Outputs to send again, and why the last attempt failed (per topic)."""

    outputs: list[Outbound] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, o: Outbound, why: str) -> None:
        self.outputs.append(o)
        self.errors.setdefault(o.topic, why)


def _too_large(exc: BaseException) -> bool:
    from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)


class Delivery:
    """Sends outputs through one KafkaProducer and accounts for every one of them."""

    def __init__(self, producer: Any, worker_id: str, flush_timeout_s: float) -> None:
        self.producer, self.worker_id, self.flush_timeout_s = producer, worker_id, flush_timeout_s
        self._inflight: list[tuple[Outbound, Any]] = []  # sent, not yet known to be acknowledged
        self._said = float("-inf")

    def deliver_all(self, outputs: list[Outbound], topics: Sequence[str],
                    pause: Callable[[float], None]) -> None:
        """Deliver every output, retrying with backoff (``pause`` may raise to give up): the
        batch stays uncommitted until all are acknowledged. ``topics``: the output topics, each
        with a ``linewatch_output_blocked`` gauge."""
        left, attempt = outputs, 0
        while True:
            result = self.deliver(left)
            left = result.outputs
            for topic in topics:
                blocked = topic in result.errors and any(o.topic == topic for o in left)
                metrics.OUTPUT_BLOCKED.labels(worker=self.worker_id, topic=topic).set(int(blocked))
            if not left and self.settled:
                return
            attempt += 1
            metrics.DELIVERY_RETRIES.labels(worker=self.worker_id).inc()
            backoff = min(30.0, 0.5 * 2 ** attempt)
            if attempt == 1 or time.monotonic() - self._said >= 60:  # once a minute, not per retry
                self._said = time.monotonic()
                why = "; ".join(f"{t}: {e}" for t, e in result.errors.items())
                log.error("%d output(s) not delivered (%s); the batch stays uncommitted, retrying in "
                          "%.0fs. If this persists: does the topic exist (linewatch topics), may "
                          "this worker write to it, is the broker up?", len(left), why, backoff)
            pause(backoff)

    def deliver(self, outputs: list[Outbound]) -> Undelivered:
        """Send ``outputs`` (and settle earlier in-flight ones); what still needs sending."""
        from kafka.errors import KafkaError

        left = Undelivered()
        replaced: list[Outbound] = []
        sent, self._inflight = self._inflight, []
        stalled: set[str] = set()  # topics whose send() timed out: the rest of them wait
        for o in outputs:
            if o.topic in stalled:
                left.add(o, left.errors[o.topic])
                continue
            try:
                sent.append((o, self.producer.send(o.topic, key=o.key, value=o.value, headers=o.headers)))
            except KafkaError as exc:
                if _too_large(exc):
                    self._shrink(o, exc, replaced)
                else:  # e.g. no metadata for the topic within max_block_ms
                    stalled.add(o.topic)
                    left.add(o, f"{type(exc).__name__}: {exc}")
        try:
            self.producer.flush(timeout=self.flush_timeout_s)
        except KafkaError as exc:
            log.warning("producer flush did not finish (%s); unsettled outputs are kept", exc)
        for o, fut in sent:
            if not fut.is_done:  # still in the producer: never sent twice, settled next time
                self._inflight.append((o, fut))
                left.errors.setdefault(o.topic, "not acknowledged yet")
            elif fut.failed():
                if _too_large(fut.exception):
                    self._shrink(o, fut.exception, replaced)
                else:
                    left.add(o, f"{type(fut.exception).__name__}: {fut.exception}")
        if replaced:
            again = self.deliver(replaced)
            left.outputs += again.outputs
            for topic, why in again.errors.items():
                left.errors.setdefault(topic, why)
        return left

    @property
    def settled(self) -> bool:
        return not self._inflight

    def _shrink(self, o: Outbound, exc: BaseException, replaced: list[Outbound]) -> None:
        smaller = o.fallback() if o.fallback is not None else None
        if smaller is not None and len(smaller.value) < len(o.value):
            metrics.OUTPUTS_SHRUNK.labels(worker=self.worker_id, topic=o.topic).inc()
            log.warning("%s refused a %d-byte output as too large (%s); sending its %d-byte "
                        "smaller form", o.topic, len(o.value), type(exc).__name__, len(smaller.value))
            replaced.append(smaller)
            return
        metrics.OUTPUTS_DROPPED.labels(worker=self.worker_id, topic=o.topic).inc()
        log.error("%s refused a %d-byte output as too large (%s) and it has no smaller form: "
                  "dropped. Raise the topic's max.message.bytes (and the worker's "
                  "--max-frame-bytes) if these outputs matter.", o.topic, len(o.value),
                  type(exc).__name__)
