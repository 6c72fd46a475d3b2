"""Read what the workers produced and account for every frame.

Used by the demo's summary, the end-to-end tests and the benchmarks: it
consumes ``.scores``, ``.deadletter``, ``.alerts`` and ``.review`` from the
beginning (its own throw-away consumer group) and deduplicates by
(camera, sequence number), so at-least-once re-deliveries show up as counted
duplicates, not as extra frames. Three kinds are told apart:

* a frame record scored twice (a worker re-read it after a failure): a
  *duplicate*, *marked* when one copy carries ``maybe_duplicate`` (the worker
  knew it might be re-scoring); an unmarked one is a re-delivery nobody owned up to;
* the same frame on ``.frames`` twice (a camera's producer retried a send whose
  acknowledgement was lost): an *input duplicate*, two offsets, each scored once;
* one output written twice by a worker's producer retry: an *output copy*,
  identical down to the decision time, not a second decision. A dead letter
whose headers were too broken to name its camera is identified by the source
record's position instead. A record that is not what its topic promises is
counted as malformed and skipped, never a crash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from linewatch.wire import (
    Alert,
    DeadLetter,
    ReviewItem,
    Score,
    Topics,
    parse_dead_letter,
)

log = logging.getLogger(__name__)

FrameKey = tuple[str, str]


@dataclass
class Tally:
    scores: dict[FrameKey, Score] = field(default_factory=dict)
    dead: dict[FrameKey, DeadLetter] = field(default_factory=dict)
    alerts: set[FrameKey] = field(default_factory=set)
    reviews: dict[FrameKey, ReviewItem] = field(default_factory=dict)
    duplicate_scores: int = 0
    duplicate_dead: int = 0
    input_duplicates: int = 0
    output_copies: int = 0
    unmarked_duplicates: list[FrameKey] = field(default_factory=list)
    duplicate_times_ns: list[int] = field(default_factory=list)  # decided_ns of each second copy
    malformed: dict[str, int] = field(default_factory=dict)  # topic -> records skipped

    @property
    def accounted(self) -> set[FrameKey]:
        return set(self.scores) | set(self.dead)

    @property
    def unrouted(self) -> set[FrameKey]:
        """Scored frames whose alert or review record has not been read yet: a worker sends a
        frame's outputs to several topics, and a reader sees each topic at its own pace, so a
        score can arrive before the review item sent beside it."""
        seen = {"alert": self.alerts, "review": self.reviews}
        return {k for k, s in self.scores.items() if s.decision in seen and k not in seen[s.decision]}

    @property
    def duplicates(self) -> int:
        return self.duplicate_scores + self.duplicate_dead

    def add_score(self, s: Score) -> None:
        k = (s.camera, str(s.seq))
        first = self.scores.get(k)
        if first is None:
            self.scores[k] = s
            return
        if first.ref != s.ref:
            self.input_duplicates += 1
        elif (first.worker, first.decided_ns) == (s.worker, s.decided_ns):
            self.output_copies += 1
        else:
            self.duplicate_scores += 1
            self.duplicate_times_ns.append(max(first.decided_ns, s.decided_ns))
            if not (first.maybe_duplicate or s.maybe_duplicate):
                self.unmarked_duplicates.append(k)

    def add_dead(self, dl: DeadLetter) -> None:
        k = (dl.camera, str(dl.seq)) if dl.camera and dl.seq is not None else ("@", str(dl.source))
        if k in self.dead:
            self.duplicate_dead += 1
        else:
            self.dead[k] = dl

    def dead_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dl in self.dead.values():
            out[dl.reason] = out.get(dl.reason, 0) + 1
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
        causes = [dl.cause for dl in self.dead.values()]
        out = {
            "frames_produced": len(produced),
            "frames_scored": len(self.scores),
            "frames_lost": len(produced - self.accounted),
            "duplicates": self.duplicates,
            "unmarked_duplicates": len(self.unmarked_duplicates),
            "input_duplicates": self.input_duplicates,
            "output_copies": self.output_copies,
            "alerts": len(self.alerts),
            "review_items": len(self.reviews),
            "alerts_or_reviews_missing": len(self.unrouted),
            "dead_letters": len(self.dead),
            "dead_letters_bad_input": causes.count("bad_input"),
            "dead_letters_failed": causes.count("failed"),
            "dead_letter_reasons": self.dead_reasons(),
            "malformed_records": sum(self.malformed.values()),
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
        if any(s.mode for s in self.scores.values()):
            out["zero_shot"] = self.zero_shot()
        return out

    def zero_shot(self) -> dict[str, object]:
        """A zero-shot (mutual) line's decisions after its warm-up: frames scored in warm-up go
        to review by design, so recall and the false-alarm rate (normal frames that alerted,
        over normal frames) are counted over the frames after it."""
        modes = [s.mode or "none" for s in self.scores.values()]
        after = [s for s in self.scores.values() if s.truth and s.mode not in (None, "warm-up")]
        pos = [s for s in after if s.truth == "defect"]
        neg = [s for s in after if s.truth != "defect"]
        return {
            "frames_by_mode": {m: modes.count(m) for m in sorted(set(modes))},
            "frames_after_warm_up": len(after),
            "uncalibrated_frames": sum(1 for s in self.scores.values() if not s.calibrated),
            "recall": round(sum(s.decision == "alert" for s in pos) / len(pos), 4) if pos else None,
            "recall_alert_or_review": (round(sum(s.decision != "normal" for s in pos) / len(pos), 4)
                                       if pos else None),
            "false_alarm_rate": (round(sum(s.decision == "alert" for s in neg) / len(neg), 4)
                                 if neg else None),
            "review_rate_normals": (round(sum(s.decision == "review" for s in neg) / len(neg), 4)
                                    if neg else None),
            "defects_after_warm_up": len(pos),
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
        from kafka.errors import KafkaError

        try:
            got = self.consumer.poll(timeout_ms=timeout_ms)
        except (KafkaError, ValueError) as exc:  # broker restarting, or an unparsable record
            log.warning("tally: polling failed (%s)", exc)
            return 0
        n = 0
        for records in got.values():
            for rec in records:
                n += 1
                try:
                    self._add(rec)
                except Exception as exc:  # WireError, or any parser gap: counted, skipped
                    self.tally.malformed[rec.topic] = self.tally.malformed.get(rec.topic, 0) + 1
                    log.warning("tally: skipping %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, exc)
        return n

    def _add(self, rec: object) -> None:
        topic, value = rec.topic, rec.value  # type: ignore[attr-defined]
        if topic == self.topics.scores:
            self.tally.add_score(Score.from_bytes(value))
        elif topic == self.topics.deadletter:
            self.tally.add_dead(parse_dead_letter(rec.headers))  # type: ignore[attr-defined]
        elif topic == self.topics.alerts:
            a = Alert.from_bytes(value)
            self.tally.alerts.add((a.camera, str(a.seq)))
        elif topic == self.topics.review:
            r = ReviewItem.from_bytes(value)
            self.tally.reviews.setdefault((r.camera, str(r.seq)), r)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
