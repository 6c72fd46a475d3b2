"""Thresholds from normal frames, without any defect examples.

A line starts with no labelled defects, so the alert threshold is set from
held-out normal frames: it is the conformal quantile that bounds the false-alarm
rate on exchangeable normal frames at ``false_alarm_rate``. The review band
below it is set the same way at a (larger) review rate: normal frames land in
review at about that rate, which is the budget of operator attention.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    alert: float
    review: float
    n_normals: int
    guaranteed: bool  # False when too few normals to bound the alert rate at the target
    # thresholds not calibrated on normal frames say so where people see them (review items)
    uncalibrated: str | None = None

    def decide(self, score: float) -> str:
        if score >= self.alert:
            return "alert"
        if score >= self.review:
            return "review"
        return "normal"


def conformal_quantile(scores: Sequence[float], rate: float) -> tuple[float, bool]:
    """Smallest threshold t with P(normal score >= t) <= rate (split-conformal).

    Returns (t, guaranteed). With n normals the guarantee needs
    ceil((n + 1)(1 - rate)) <= n; with fewer, the maximum is returned just above
    itself and ``guaranteed`` is False (the caller must say so, not hide it).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no normal scores to calibrate from")
    k = math.ceil((n + 1) * (1.0 - rate))
    if k > n:
        return float(np.nextafter(s[-1], np.inf)), False
    return float(np.nextafter(s[k - 1], np.inf)), True


def thresholds_from_normals(scores: Sequence[float], false_alarm_rate: float = 0.01,
                            review_rate: float = 0.1) -> Thresholds:
    if not 0 < false_alarm_rate < review_rate < 1:
        raise ValueError("need 0 < false_alarm_rate < review_rate < 1")
    alert, ok = conformal_quantile(scores, false_alarm_rate)
    review, _ = conformal_quantile(scores, review_rate)
    if not ok:
        log.warning(
            "only %d held-out normal frames: the alert threshold is set just above the highest "
            "normal score and cannot guarantee a false-alarm rate of %.2g; give at least %d.",
            len(scores), false_alarm_rate, math.ceil(1 / false_alarm_rate))
    return Thresholds(alert=alert, review=min(review, alert), n_normals=len(scores), guaranteed=ok)


def score_frames(scorer: object, frames: Sequence[np.ndarray], batch_size: int = 8,
                 on_batch: Callable[[int], object] | None = None) -> list:
    """Score frames in batches; the ScoreResults in input order. ``on_batch(n)`` after each
    batch of n frames (a progress bar's ``update``)."""
    out: list = []
    for i in range(0, len(frames), batch_size):
        chunk = frames[i:i + batch_size]
        out.extend(scorer.score(chunk))  # type: ignore[attr-defined]
        if on_batch is not None:
            on_batch(len(chunk))
    return out


class CalibrationFrames:
    """Held-out normal frames whose scores set the thresholds, scored again cheaply each
    time the reference memory grows.

    Recalibrating after operators' verdicts needs these frames' scores under the grown
    memory. Re-running the backbone on all of them took seconds on a CPU worker each time
    (17% of the demo worker's time, and the stall behind its worst latencies). A scorer
    that can keep their features (``prepare``/``rescore``, as
    :class:`~inference.scoring.PatchKNNScorer` does) matches them only against the memory
    rows added since; other scorers, or a different scorer (a new profile), score them in
    full.
    """

    def __init__(self, frames: Sequence[np.ndarray], batch_size: int = 8) -> None:
        if len(frames) == 0:
            raise ValueError("no calibration frames")
        self.frames = list(frames)
        self.batch_size = batch_size
        self._prepared = None
        self._owner: object | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def results(self, scorer: object, on_batch: Callable[[int], object] | None = None) -> list:
        """Full results (maps, embeddings) under ``scorer``, kept ready for :meth:`scores`."""
        self._prepared, self._owner = None, None
        if hasattr(scorer, "prepare"):
            self._prepared = scorer.prepare(self.frames, self.batch_size, on_batch)
            self._owner = scorer
            return list(self._prepared.results)
        return score_frames(scorer, self.frames, self.batch_size, on_batch)

    def extend(self, frames: Sequence[np.ndarray]) -> None:
        """More calibration frames; prepared frames stay prepared when the scorer's prepared
        form can grow (``extend``), so only the new ones go through the backbone."""
        frames = list(frames)
        self.frames += frames
        if not frames or self._prepared is None:
            return
        if hasattr(self._prepared, "extend"):
            self._prepared.extend(self._owner.prepare(frames, self.batch_size))  # type: ignore[union-attr]
        else:
            self._prepared, self._owner = None, None

    def scores(self, scorer: object) -> list[float]:
        """The frames' scores under ``scorer``'s memory as it is now."""
        if self._prepared is not None and self._owner is scorer:
            got = scorer.rescore(self._prepared)  # type: ignore[attr-defined]
            if got is not None:
                return got
        return [r.score for r in self.results(scorer)]


DEFAULT_EXPECTED_ANOMALY_RATE = 0.05  # a zero-shot worker's --expected-anomaly-rate


class StreamThresholds:
    """Uncalibrated thresholds for a line with no labelled normal frame (zero-shot).

    Each stream (camera) keeps a bounded window of its recent scores. With at most
    ``expected_anomaly_rate`` of frames defective, the alert threshold is the window's
    (1 - rate) quantile: no more than that share of frames can alert. The review band
    starts at the (1 - 3 x rate) quantile. Both also have a floor of the window's median
    plus ``spread`` robust standard deviations (1.4826 MAD), so a stream with fewer
    defects than stated does not alert on its normal frames just to fill the quota.
    Nothing here is a guarantee: that needs operator-confirmed normals (conformal
    thresholds, :func:`thresholds_from_normals`), which is why these are called
    *uncalibrated* everywhere they are shown. A stream with fewer than ``min_scores``
    scores has no thresholds (None): its frames need a person.
    """

    def __init__(self, expected_anomaly_rate: float = DEFAULT_EXPECTED_ANOMALY_RATE, window: int = 512,
                 min_scores: int = 32,
                 spread: float = 4.0, max_streams: int = 256) -> None:
        if not 0 < expected_anomaly_rate < 0.3:
            raise ValueError(f"expected anomaly rate {expected_anomaly_rate}: give a share of frames "
                             "between 0 and 0.3, e.g. 0.05")
        if min_scores < 2 or window < min_scores:
            raise ValueError(f"need 2 <= min_scores <= window, got {min_scores}, {window}")
        self.rate, self.window, self.min_scores = expected_anomaly_rate, window, min_scores
        self.spread, self.max_streams = spread, max_streams
        self._scores: dict[object, deque[float]] = {}

    def observe(self, stream: object, score: float) -> None:
        buf = self._scores.pop(stream, None)  # re-inserted: dict order is least recently seen first
        if buf is None:
            buf = deque(maxlen=self.window)
            while len(self._scores) >= self.max_streams:
                del self._scores[next(iter(self._scores))]
        buf.append(float(score))
        self._scores[stream] = buf

    def count(self, stream: object) -> int:
        return len(self._scores.get(stream, ()))

    def forget(self, stream: object) -> None:
        self._scores.pop(stream, None)

    def thresholds(self, stream: object) -> Thresholds | None:
        buf = self._scores.get(stream)
        if buf is None or len(buf) < self.min_scores:
            return None
        s = np.asarray(buf)
        med = float(np.median(s))
        floor = med + self.spread * 1.4826 * float(np.median(np.abs(s - med)))
        alert = max(float(np.quantile(s, 1.0 - self.rate)), floor)
        review = min(alert, max(float(np.quantile(s, 1.0 - min(0.5, 3 * self.rate))),
                                med + 0.5 * (floor - med)))
        # just above: a camera whose scores are all equal (a frozen feed) sends nothing to review
        alert = float(np.nextafter(alert, np.inf))
        review = min(alert, float(np.nextafter(review, np.inf)))
        return Thresholds(alert=alert, review=review,
                          n_normals=0, guaranteed=False, uncalibrated=(
                              f"uncalibrated thresholds, from this camera's last {len(s)} scores and "
                              f"an expected anomaly rate of at most {self.rate:g}"))


# A camera in warm-up has no thresholds: every frame goes to review. Mutual scores are cosine
# distances of unit vectors, at most 2, so no frame reaches this alert threshold.
WARM_UP = Thresholds(alert=float(np.nextafter(2.0, 3.0)), review=0.0, n_normals=0, guaranteed=False,
                     uncalibrated="warm-up: this camera has too few frames yet to compare with or "
                                  "to set thresholds from, so every frame is for a person to judge")
