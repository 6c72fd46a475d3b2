"""Operators' verdicts flowing back into a worker: reference memory and thresholds.

Every worker must know every verdict (they all score the same line), so labels
are not consumed as a group: each worker reads all partitions of ``.labels``
from the beginning. Replaying the topic at start-up is what makes learned
normals survive a restart; the memory is bounded (oldest learned frames are
evicted first) so a long-running line does not grow it without limit.

What a verdict changes:

* **normal**: the frame (the review item's copy, carried in the label) joins the
  reference memory, so the same kind of frame stops looking unusual;
* **thresholds** are then re-derived: the held-out calibration frames are scored
  against the grown memory and the conformal quantiles recomputed, so the
  false-alarm target still holds for the memory actually in use;
* **defect**: counted (``linewatch_labels_applied_total``); it does not move
  thresholds, since confirmed defects were already flagged.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from inference.calibration import Thresholds, score_frames, thresholds_from_normals
from linewatch.wire import Label, WireError
from monitoring import metrics

log = logging.getLogger(__name__)

MAX_SEEN_LABELS = 100_000


class LabelFollower:
    """Reads every partition of ``.labels`` from the start, without a consumer group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False, client_id="linewatch-labels",
                                      fetch_max_wait_ms=100, max_partition_fetch_bytes=16 << 20)
        parts = self.consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:  # metadata may lag a fresh topic
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist: create it (linewatch topics) first")
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 0) -> list[Label]:
        out: list[Label] = []
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for rec in records:
                try:
                    out.append(Label.from_bytes(rec.value))
                except WireError as exc:
                    log.warning("ignoring label %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, exc)
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


@dataclass
class LearnResult:
    added: int
    thresholds: Thresholds | None = None  # new thresholds when they were recalibrated
    holdout_scores: list[float] | None = None  # the calibration frames' scores behind them


class ReferenceLearner:
    """Applies verdicts to a fitted scorer: bounded learned normals plus recalibration."""

    def __init__(self, scorer: Any, references: Sequence[np.ndarray], holdout: Sequence[np.ndarray] | None,
                 worker_id: str, max_learned: int = 200, false_alarm_rate: float = 0.01,
                 review_rate: float = 0.1) -> None:
        if max_learned < 1:
            raise ValueError("max_learned must be >= 1")
        self.scorer = scorer
        self.references = list(references)
        self.holdout = list(holdout) if holdout else None
        self.worker_id = worker_id
        self.max_learned = max_learned
        self.false_alarm_rate, self.review_rate = false_alarm_rate, review_rate
        self.learned: deque[tuple[str, np.ndarray]] = deque()
        # ids of applied labels, to count a redelivered label once; bounded (oldest forgotten),
        # since redeliveries arrive close to the original and verdicts accumulate for years
        self.seen: dict[str, None] = {}
        metrics.LEARNED_NORMALS.labels(worker=worker_id).set(0)
        for verdict in ("normal", "defect"):
            metrics.LABELS_APPLIED.labels(worker=worker_id, verdict=verdict)

    def apply(self, labels: Sequence[Label]) -> LearnResult:
        fresh: list[tuple[str, np.ndarray]] = []
        for lab in labels:
            if lab.item_id in self.seen or lab.verdict == "skip":
                continue  # at-least-once delivery: a label seen twice counts once
            self.seen[lab.item_id] = None
            if len(self.seen) > MAX_SEEN_LABELS:
                del self.seen[next(iter(self.seen))]
            metrics.LABELS_APPLIED.labels(worker=self.worker_id, verdict=lab.verdict).inc()
            if lab.verdict == "normal":
                image = _decode(lab)
                if image is not None:
                    fresh.append((lab.item_id, image))
        if not fresh:
            return LearnResult(0)
        self.learned.extend(fresh)
        if len(self.learned) > self.max_learned:
            # evict the oldest, with 10% slack so a refit happens every few dozen labels, not each
            keep = max(1, int(self.max_learned * 0.9))
            while len(self.learned) > keep:
                self.learned.popleft()
            self.scorer.fit(self.references + [im for _, im in self.learned])
        else:
            self.scorer.add_normals([im for _, im in fresh])
        log.info("learned %d normal frame(s) from operator verdicts (%d in memory)", len(fresh),
                 len(self.learned))
        result = LearnResult(len(fresh))
        if self.holdout:
            scores = [r.score for r in score_frames(self.scorer, self.holdout)]
            th = thresholds_from_normals(scores, self.false_alarm_rate, self.review_rate)
            metrics.RECALIBRATIONS.labels(worker=self.worker_id).inc()
            result = LearnResult(len(fresh), th, scores)
        # set last, so "learned == N" also means "recalibrated for them"
        metrics.LEARNED_NORMALS.labels(worker=self.worker_id).set(len(self.learned))
        metrics.REFERENCE_IMAGES.labels(worker=self.worker_id).set(len(self.references) + len(self.learned))
        return result


def _decode(lab: Label) -> np.ndarray | None:
    if not lab.frame_jpeg_b64:
        log.warning("normal verdict on %s carries no frame; cannot learn it", lab.item_id)
        return None
    try:
        buf = np.frombuffer(base64.b64decode(lab.frame_jpeg_b64), np.uint8)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except (ValueError, cv2.error):
        bgr = None
    if bgr is None:
        log.warning("normal verdict on %s: its frame does not decode; not learned", lab.item_id)
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
