"""Read what the workers produced and account for every frame.

Used by the demo's summary, the end-to-end tests and the benchmark: it
consumes ``.scores``, ``.deadletter``, ``.alerts`` and ``.review`` from the
beginning (its own throw-away consumer group) and deduplicates by
(camera, sequence number), so at-least-once re-deliveries show up as counted
duplicates, not as extra frames. A dead letter whose headers were too broken
to name its camera is identified by the source record's position instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from linewatch.wire import (
    H_CAMERA,
    H_DL_REASON,
    H_DL_SOURCE,
    H_SEQ,
    Alert,
    ReviewItem,
    Score,
    Topics,
    headers_dict,
)

FrameKey = tuple[str, str]


@dataclass
class Tally:
    scores: dict[FrameKey, Score] = field(default_factory=dict)
    dead: dict[FrameKey, dict[str, str]] = field(default_factory=dict)
    alerts: set[FrameKey] = field(default_factory=set)
    reviews: dict[FrameKey, ReviewItem] = field(default_factory=dict)
    duplicate_scores: int = 0
    duplicate_dead: int = 0

    @property
    def accounted(self) -> set[FrameKey]:
        return set(self.scores) | set(self.dead)

    @property
    def duplicates(self) -> int:
        return self.duplicate_scores + self.duplicate_dead

    def add_score(self, s: Score) -> None:
        k = (s.camera, str(s.seq))
        if k in self.scores:
            self.duplicate_scores += 1
        else:
            self.scores[k] = s

    def add_dead(self, headers: list[tuple[str, bytes]] | None) -> None:
        h = headers_dict(headers)
        cam, seq = h.get(H_CAMERA), h.get(H_SEQ)
        k = (cam, seq) if cam and seq and seq.isdigit() else ("@", h.get(H_DL_SOURCE, "?"))
        if k in self.dead:
            self.duplicate_dead += 1
        else:
            self.dead[k] = h

    def dead_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.dead.values():
            r = h.get(H_DL_REASON, "?")
            out[r] = out.get(r, 0) + 1
        return out

    def summary(self, produced: Iterable[FrameKey], elapsed_s: float) -> dict[str, object]:
        produced = set(produced)
        lat = np.array([s.latency_s * 1000 for s in self.scores.values()]) if self.scores else None
        truth = [(s.truth == "defect", s.decision) for s in self.scores.values() if s.truth]
        tp = sum(1 for t, d in truth if t and d == "alert")
        fp = sum(1 for t, d in truth if not t and d == "alert")
        fn = sum(1 for t, d in truth if t and d != "alert")
        flagged = sum(1 for t, d in truth if t and d in ("alert", "review"))
        positives = sum(1 for t, _ in truth if t)
        return {
            "frames_produced": len(produced),
            "frames_scored": len(self.scores),
            "frames_lost": len(produced - self.accounted),
            "duplicates": self.duplicates,
            "alerts": len(self.alerts),
            "review_items": len(self.reviews),
            "dead_letters": len(self.dead),
            "dead_letter_reasons": self.dead_reasons(),
            "frames_per_second": round(len(self.accounted & produced) / elapsed_s, 3) if elapsed_s else 0.0,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 1) if lat is not None else None,
                "p99": round(float(np.percentile(lat, 99)), 1) if lat is not None else None,
            },
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "recall_alert_or_review": round(flagged / positives, 4) if positives else None,
            "defects_in_feed": positives,
        }


class TallyReader:
    """Consumes the output topics into a :class:`Tally`."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        from kafka import KafkaConsumer

        self.topics = topics
        self.tally = Tally()
        self.consumer = KafkaConsumer(
            topics.scores, topics.deadletter, topics.alerts, topics.review,
            bootstrap_servers=bootstrap, group_id=f"linewatch-tally-{uuid.uuid4().hex[:8]}",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=6000, heartbeat_interval_ms=1000,
            max_partition_fetch_bytes=16 * 1024 * 1024)

    def poll(self, timeout_ms: int = 200) -> int:
        n = 0
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for rec in records:
                n += 1
                if rec.topic == self.topics.scores:
                    self.tally.add_score(Score.from_bytes(rec.value))
                elif rec.topic == self.topics.deadletter:
                    self.tally.add_dead(rec.headers)
                elif rec.topic == self.topics.alerts:
                    a = Alert.from_bytes(rec.value)
                    self.tally.alerts.add((a.camera, str(a.seq)))
                elif rec.topic == self.topics.review:
                    r = ReviewItem.from_bytes(rec.value)
                    self.tally.reviews.setdefault((r.camera, str(r.seq)), r)
        return n

    def close(self) -> None:
        self.consumer.close(autocommit=False)
