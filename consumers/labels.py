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

Only labels signed by the review service (HMAC with ``LINEWATCH_LABEL_KEY``) are
applied: anyone who can write to Kafka could otherwise teach every worker that a
defect is normal. A label that is malformed, unsigned, forged, or carries an
image over the frame limits is counted (``linewatch_records_rejected_total``),
logged once with its position and skipped; a bad record on ``.labels`` (kept
forever) must never stop a worker from starting.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inference.calibration import CalibrationFrames, Thresholds, thresholds_from_normals
from linewatch.images import decode_limited
from linewatch.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    MESSAGE_REASONS,
    Label,
    WireError,
)
from monitoring import metrics

log = logging.getLogger(__name__)

MAX_SEEN_LABELS = 100_000
# the learned normals' memory rows kept (float16, in CPU memory) so that a refit after
# evicting the oldest runs no backbone pass; once the kept rows (references' included) would
# pass this, the learner drops them and refits from the images, as before (logged once)
MAX_KEPT_ROW_BYTES = 512 * 2**20
LABEL_FETCH_WAIT_MS = 1000


@dataclass(frozen=True)
class Verdict:
    """A verified label and, for a normal verdict, its decoded frame."""

    label: Label
    image: np.ndarray | None = None


class LabelFollower:
    """Reads every partition of ``.labels`` from the start, without a consumer group, and
    hands on only well-formed labels with a valid signature (and, on normal verdicts, a
    frame within the frame limits)."""

    def __init__(self, bootstrap: str, topic: str, key: bytes,
                 max_image_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        self.topic, self.key = topic, key
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False, client_id="linewatch-labels",
                                      # verdicts are rare and wait to settle anyway: a long
                                      # poll, not ten fetches a second decoded on a thread that
                                      # takes the interpreter lock from the scoring loop
                                      fetch_max_wait_ms=LABEL_FETCH_WAIT_MS,
                                      max_partition_fetch_bytes=16 << 20)
        parts = self.consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:  # metadata may lag a fresh topic
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist: create it (linewatch topics) first")
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.consumer.seek_to_beginning()
        for reason in MESSAGE_REASONS:
            metrics.RECORDS_REJECTED.labels(reader="worker-labels", topic=topic, reason=reason)
        self._poll_failed_at = float("-inf")

    def poll(self, timeout_ms: int = 0) -> list[Verdict]:
        """Verified labels read since the last call (never raises for a record's content)."""
        from kafka.errors import KafkaError

        try:
            got = self.consumer.poll(timeout_ms=timeout_ms)
        except (KafkaError, ValueError) as exc:  # broker away, or a record the client cannot
            # parse (e.g. a header key that is not UTF-8): labels wait, frames go on
            if time.monotonic() - self._poll_failed_at > 60:
                self._poll_failed_at = time.monotonic()
                log.error("reading %s failed (%s); retrying", self.topic, exc)
            return []
        out: list[Verdict] = []
        for records in got.values():
            for rec in records:
                try:
                    lab = Label.from_signed_bytes(rec.value, self.key)
                    out.append(Verdict(lab, self._image(lab)))
                except WireError as exc:
                    _reject(rec, exc)
                except Exception as exc:  # a parser gap must not stop a worker: still refused
                    _reject(rec, WireError("bad_message", f"{type(exc).__name__}: {exc}"))
        return out

    def _image(self, lab: Label) -> np.ndarray | None:
        if lab.verdict != "normal" or not lab.frame_jpeg_b64:
            return None
        try:
            data = base64.b64decode(lab.frame_jpeg_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WireError("bad_image", f"frame of {lab.item_id} is not base64") from exc
        try:
            return decode_limited(data, self.max_image_bytes, self.max_image_pixels)
        except WireError as exc:
            raise WireError("bad_image", f"frame of {lab.item_id}: {exc}") from exc

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def _reject(rec: Any, exc: WireError, reader: str = "worker-labels") -> None:
    """Count and log (once: the record is never read again by this reader) a refused label."""
    metrics.RECORDS_REJECTED.labels(reader=reader, topic=rec.topic, reason=exc.reason).inc()
    log.warning("ignoring label %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, exc)


@dataclass
class LearnResult:
    added: int
    thresholds: Thresholds | None = None  # new thresholds when they were recalibrated
    holdout_scores: list[float] | None = None  # the calibration frames' scores behind them


class ReferenceLearner:
    """Applies verdicts to a fitted scorer: bounded learned normals plus recalibration."""

    def __init__(self, scorer: Any, references: Sequence[np.ndarray], holdout: CalibrationFrames | None,
                 worker_id: str, max_learned: int = 200, false_alarm_rate: float = 0.01,
                 review_rate: float = 0.1, recalibrate: bool = True,
                 calibrate_from_verdicts: bool = False) -> None:
        """``holdout``: the calibration frames, rescored after each change of the memory (the
        drift reference follows them); ``recalibrate``: thresholds are re-derived from those
        scores (False: thresholds given by hand stay as given).
        ``calibrate_from_verdicts`` (zero-shot, no holdout): every second confirmed normal is
        kept out of the memory as a calibration frame; once there are
        :attr:`calibration_needed` of them they become the holdout, and the thresholds are
        conformal from then on."""
        if max_learned < 1:
            raise ValueError("max_learned must be >= 1")
        self.scorer = scorer
        self.references = list(references)
        self.holdout = holdout  # None: nothing to rescore (a profile, or no --holdout)
        self.recalibrate = recalibrate
        self.worker_id = worker_id
        self.max_learned = max_learned
        self.false_alarm_rate, self.review_rate = false_alarm_rate, review_rate
        self.learned: deque[tuple[str, np.ndarray]] = deque()
        # each learned frame's memory rows (scorer.memory_views, float16), beside self.learned;
        # None: the scorer cannot refit from rows (no fit_views, or a trained head), or they
        # would exceed MAX_KEPT_ROW_BYTES
        self._rows: deque[list[Any]] | None = self._row_store(scorer)
        self._reference_rows: list[list[Any]] | None = None
        if self._rows is None and scorer is not None:
            log.info("%s keeps no memory rows of learned normals (%s): a refit after evicting old "
                     "ones runs the backbone on every learned frame", getattr(scorer, "name", "the scorer"),
                     "a trained head" if getattr(scorer, "adapt_steps", 0) else "it has no fit_views")
        self.calibrate_from_verdicts = calibrate_from_verdicts
        self.calibration: deque[np.ndarray] = deque(maxlen=max_learned)
        self._confirmed = 0  # normal verdicts learned so far (which half each goes to)
        # conformal needs n with ceil((n + 1)(1 - rate)) <= n to bound the false-alarm rate
        self.calibration_needed = math.ceil((1 - false_alarm_rate) / false_alarm_rate - 1e-9)
        if calibrate_from_verdicts and self.calibration_needed > max_learned:
            raise ValueError(f"a false-alarm rate of {false_alarm_rate:g} needs {self.calibration_needed} "
                             f"confirmed normals to calibrate on, more than --max-learned-normals "
                             f"{max_learned} keeps: raise it or the rate")
        self._waiting: list[tuple[str, np.ndarray]] = []  # verified, not yet in the memory
        self._stale = False  # the memory grew but the thresholds were not recalibrated yet
        self._first_waiting: float | None = None
        self._last_arrival = 0.0
        self._retry_at = 0.0
        # ids of applied labels, to count a redelivered label once; bounded (oldest forgotten),
        # since redeliveries arrive close to the original and verdicts accumulate for years
        self.seen: dict[str, None] = {}
        metrics.LEARNED_NORMALS.labels(worker=worker_id).set(0)
        for verdict in ("normal", "defect"):
            metrics.LABELS_APPLIED.labels(worker=worker_id, verdict=verdict)

    @staticmethod
    def _row_store(scorer: Any) -> deque[list[Any]] | None:
        return deque() if hasattr(scorer, "fit_views") and not getattr(scorer, "adapt_steps", 0) else None

    def rebase(self, scorer: Any, references: Sequence[np.ndarray]) -> None:
        """A new profile's scorer and references: the learned normals go into its memory, their
        rows computed again by it (the kept ones came from the old profile's model)."""
        learned = list(self.learned)
        self.scorer, self.references = scorer, list(references)
        self.learned, self._rows, self._reference_rows = deque(), self._row_store(scorer), None
        if learned:
            try:
                self._grow(learned)
            except Exception:  # the error reaches the caller as before; what the learner holds
                self.learned, self._rows = deque(learned), None  # stays whole (refits from images)
                raise

    def apply(self, verdicts: Sequence[Verdict]) -> None:
        """Take verified verdicts in (counted at once); :meth:`learn` adds the normal ones to
        the memory when :meth:`due` says so."""
        fresh: list[tuple[str, np.ndarray]] = []
        for v in verdicts:
            lab = v.label
            if lab.item_id in self.seen or lab.verdict == "skip":
                continue  # at-least-once delivery: a label seen twice counts once
            self.seen[lab.item_id] = None
            if len(self.seen) > MAX_SEEN_LABELS:
                del self.seen[next(iter(self.seen))]
            metrics.LABELS_APPLIED.labels(worker=self.worker_id, verdict=lab.verdict).inc()
            if lab.verdict == "normal":
                if v.image is None:
                    log.warning("normal verdict on %s carries no frame; cannot learn it", lab.item_id)
                else:
                    fresh.append((lab.item_id, v.image))
        if fresh:
            now = time.monotonic()
            self._first_waiting = self._first_waiting or now
            self._last_arrival = now
        self._waiting.extend(fresh)
        del self._waiting[:-self.max_learned]  # older ones would be evicted right away anyway

    def due(self, settle_s: float = 2.0, max_delay_s: float = 30.0) -> bool:
        """Whether to learn now: verdicts (or a recalibration) wait, and either none arrived
        for ``settle_s`` or the oldest has waited ``max_delay_s``. Operators answer one item
        at a time; learning each on arrival rescored the whole holdout per verdict, blocking
        the worker's loop for seconds every time."""
        if not (self._waiting or self._stale):
            return False
        now = time.monotonic()
        if now < self._retry_at:
            return False
        if not self._waiting:
            return True  # only the recalibration is left (a model failure interrupted it)
        return (now - self._last_arrival >= settle_s
                or now - (self._first_waiting or now) >= max_delay_s)

    def learn(self) -> LearnResult:
        """Learn the waiting normals and recalibrate. A model failure leaves both pending
        (logged, counted) instead of losing the verdicts or crashing the worker."""
        fresh = list(self._waiting)
        try:
            if fresh:
                to_memory, aside = fresh, []
                if self.calibrate_from_verdicts:  # split first, keep only once the memory took its half
                    to_memory, aside = self._split(fresh)
                if to_memory:
                    self._grow(to_memory)
                if self.calibrate_from_verdicts:
                    self._set_aside(len(fresh), aside)
                self._waiting.clear()
                self._first_waiting = None
                self._stale = bool(self.holdout)
            result = LearnResult(len(fresh))
            if self._stale:
                assert self.holdout is not None
                scores = self.holdout.scores(self.scorer)
                th = None
                if self.recalibrate:
                    th = thresholds_from_normals(scores, self.false_alarm_rate, self.review_rate)
                    metrics.RECALIBRATIONS.labels(worker=self.worker_id).inc()
                self._stale = False
                result = LearnResult(len(fresh), th, scores)
        except Exception as exc:  # the model failed: keep the verdicts, try again later
            self._retry_at = time.monotonic() + 10.0
            metrics.MODEL_ERRORS.labels(worker=self.worker_id).inc()
            log.error("learning %d verdict(s) failed (%s: %s); will try again", len(fresh),
                      type(exc).__name__, exc)
            return LearnResult(0)
        # set last, so "learned == N" also means "recalibrated for them"
        metrics.LEARNED_NORMALS.labels(worker=self.worker_id).set(len(self.learned))
        metrics.REFERENCE_IMAGES.labels(worker=self.worker_id).set(len(self.references) + len(self.learned))
        return result

    def _split(self, fresh: list[tuple[str, np.ndarray]]
               ) -> tuple[list[tuple[str, np.ndarray]], list[np.ndarray]]:
        """Zero-shot: every second confirmed normal is a calibration frame (never in the
        memory, so its score is a fair sample of a normal frame's): (for the memory, aside)."""
        to_memory, aside = [], []
        for k, item in enumerate(fresh, start=self._confirmed + 1):
            if k % 2:
                to_memory.append(item)
            else:
                aside.append(item[1])
        return to_memory, aside

    def _set_aside(self, n_fresh: int, aside: list[np.ndarray]) -> None:
        """Keep the calibration frames; once there are enough, they are the holdout, and the
        scorer turns few-shot (its thresholds can be calibrated from now on)."""
        self._confirmed += n_fresh
        self.calibration.extend(aside)
        n, need = len(self.calibration), self.calibration_needed
        if n >= need:
            if self.holdout is None:
                log.warning("%d operator-confirmed normal frames set aside: thresholds are calibrated "
                            "(conformal, false-alarm rate %g) and scoring is few-shot from now on",
                            n, self.false_alarm_rate)
                start = getattr(self.scorer, "start_few_shot", None)
                if start is not None:
                    start()
            if self.holdout is not None and len(self.holdout) + len(aside) <= self.max_learned:
                self.holdout.extend(aside)  # only the new frames through the backbone
            else:  # the first time, or the oldest fell out of the bounded set
                self.holdout = CalibrationFrames(list(self.calibration))
        elif aside:
            log.info("thresholds stay uncalibrated: %d of the %d confirmed normals needed for "
                     "calibration set aside (every second confirmed normal), %d more confirmations "
                     "to go", n, need, 2 * (need - n))

    def _grow(self, fresh: list[tuple[str, np.ndarray]]) -> None:
        """Add ``fresh`` to the memory; past ``max_learned``, evict the oldest and refit. With
        the learned frames' rows kept, the refit matches rows only (a refit from the images ran
        the backbone on all of them on the worker's thread: 38 s at 200 frames on 2 CPU cores,
        ``benchmarks/refit.py``); nothing here changes until the scorer holds the new memory,
        so a model error leaves the old state whole for the retry."""
        learned = deque(self.learned)
        learned.extend(fresh)
        rows = fresh_rows = None
        if self._rows is not None:
            fresh_rows = self.scorer.memory_views([im for _, im in fresh])  # the only backbone pass
            rows = deque(self._rows)
            rows.extend([[v.to("cpu", torch.float16) for v in views] for views in fresh_rows])
        references = self._reference_rows
        if len(learned) > self.max_learned:
            # evict the oldest, with 10% slack so a refit happens every few dozen labels, not each
            keep = max(1, int(self.max_learned * 0.9))
            while len(learned) > keep:
                learned.popleft()
                if rows is not None:
                    rows.popleft()
            if rows is not None and references is None:  # once: the references' rows
                references = [[v.to("cpu", torch.float16) for v in views]
                              for views in self.scorer.memory_views(self.references)]
            if rows is not None and not self._fits(references or [], rows):
                rows = references = None
            if rows is not None:
                self.scorer.fit_views([v for views in (*(references or []), *rows) for v in views])
            else:
                self.scorer.fit(self.references + [im for _, im in learned])
        elif fresh_rows is not None:
            self.scorer.add_views([v for views in fresh_rows for v in views])
        else:
            self.scorer.add_normals([im for _, im in fresh])
        if rows is not None and not self._fits(references or [], rows):
            rows = references = None
        self.learned = learned  # only once the memory holds them
        self._rows, self._reference_rows = rows, references
        log.info("learned %d normal frame(s) from operator verdicts (%d in memory)", len(fresh),
                 len(self.learned))

    @staticmethod
    def _fits(references: list[list[Any]], rows: deque[list[Any]]) -> bool:
        """Whether the kept rows stay within MAX_KEPT_ROW_BYTES (logged when they do not)."""
        held = sum(v.numel() * v.element_size() for views in (*references, *rows) for v in views)
        if held <= MAX_KEPT_ROW_BYTES:
            return True
        log.warning("the learned normals' memory rows take %.0f MB (over %d MB): they are dropped, "
                    "and refits after evicting old normals run the backbone on every learned frame",
                    held / 2**20, MAX_KEPT_ROW_BYTES // 2**20)
        return False
