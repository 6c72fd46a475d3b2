"""The per-frame work of a micro-batch, apart from Kafka: decode, score, route.

Every record of a batch leaves :meth:`FrameProcessor.process` with exactly one
named outcome, or the whole batch is deferred:

=====================================  ==============================================
outcome                                 what the worker does with it
=====================================  ==============================================
scored                                  score (+ alert or review item) to deliver
bad input                               dead letter, reason from the wire contract
fails alone, repeatedly, while the      dead letter ``scoring_failed`` (counted as
model scores a reference image          ``cause="failed"``, apart from bad input)
routing/explaining it fails             routed again without explanation; dead letter
                                        ``processing_failed`` only if that fails too
the model fails on a reference image    :class:`ModelUnavailable`: nothing is decided,
                                        the batch stays uncommitted and is retried
the batch's partitions are revoked      :class:`BatchAbandoned` (raised by ``pause``):
while it waits for a retry              nothing committed; the new owner scores it
=====================================  ==============================================

Transient model errors (a GPU out-of-memory burst) are retried with backoff;
a batch that keeps failing is split in halves down to single frames, so one
poisonous frame cannot take its batch-mates with it. An error in drift or in
the defect words for one frame affects that frame's extras only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from consumers.decode import decode_frame
from consumers.routing import Outbound, dead_letter, route
from inference.calibration import WARM_UP, StreamThresholds, Thresholds
from inference.scoring import Scorer, ScoreResult
from inference.settings import MUTUAL_MODES
from linewatch.wire import DL_REASONS, FrameMeta, FrameRef, Topics, WireError, dead_letter_cause
from monitoring import metrics
from monitoring.drift import DriftMonitor

log = logging.getLogger(__name__)


JUDGE_ROUNDS = 3  # "fails alone, while the model works" must hold this many times in a row
# drift windows are summarised for /metrics at most this often: summarising after every batch
# cost a 1-frame batch more than decoding it, while a value a second stale moved what the
# drift alert reports when it fires (tests/test_operations.py, 1 s scrapes) by a window's sixth
DRIFT_PUBLISH_S = 0.25


class ModelUnavailable(RuntimeError):
    """The model failed on a known-good reference image too: not the frames' fault."""


class BatchAbandoned(RuntimeError):
    """The batch's partitions were revoked (or the worker is stopping) while it waited."""


class Record(Protocol):
    """What a frame record offers (kafka-python's ConsumerRecord has these)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


@dataclass(frozen=True)
class RetryPolicy:
    """How often a group of frames is tried before it is split (or, alone, judged)."""

    attempts: int = 2
    backoff_s: float = 0.5
    max_backoff_s: float = 5.0

    def delay(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** retry)


@dataclass
class BatchStats:
    received: int = 0
    scored: int = 0
    dead_letters: int = 0
    alerts: int = 0
    reviews: int = 0
    maybe_duplicates: int = 0


class FrameProcessor:
    """Turns a batch of frame records into the outputs they owe. Not thread-safe: the
    worker's loop is its only caller; ``scorer``, ``thresholds`` and ``drift`` may be
    swapped between batches (profile reloads, recalibration)."""

    def __init__(self, scorer: Scorer, thresholds: Thresholds, topics: Topics, worker_id: str,
                 max_frame_bytes: int, max_pixels: int, cameras: metrics.CameraSeries,
                 describe: Callable[[np.ndarray], str] | None = None,
                 drift: DriftMonitor | None = None, probe: np.ndarray | None = None,
                 retry: RetryPolicy | None = None,
                 pause: Callable[[float], None] = time.sleep,
                 stream_thresholds: StreamThresholds | None = None) -> None:
        """``probe`` is a known-good image (a reference) that tells a broken model from a
        poisonous frame; ``pause(seconds)`` waits between retries and raises
        :class:`BatchAbandoned` when the batch should be given up. ``stream_thresholds``:
        a zero-shot (mutual) scorer's frames are decided by their camera's own uncalibrated
        thresholds until calibrated ones are set (then it is None)."""
        self.scorer, self.thresholds, self.topics = scorer, thresholds, topics
        self.worker_id = worker_id
        self.max_frame_bytes, self.max_pixels = max_frame_bytes, max_pixels
        self.cameras, self.describe, self.drift, self.probe = cameras, describe, drift, probe
        self.retry = retry or RetryPolicy()
        self.pause = pause
        self.stream_thresholds = stream_thresholds
        # zero-shot: frames for their cameras' banks and scores for their thresholds, kept
        # until the batch is committed (a batch read again must not meet itself in the bank)
        self._uncommitted: tuple[list[ScoreResult], list[tuple[tuple[str, str, str], float]]] = ([], [])
        self._last_good: np.ndarray | None = None  # the probe of scorers without references
        self.stats = BatchStats()
        self.clock = metrics.StepClock(worker_id)
        self._drift_published = float("-inf")
        self._unpublished = False  # frames observed since drift was last published
        w = worker_id
        for reason in DL_REASONS:  # rare events start at 0: "none", not "no data"
            metrics.DEAD_LETTERS.labels(worker=w, reason=reason, cause=dead_letter_cause(reason))
        for stage in ("routing", "explain", "drift"):
            metrics.FRAME_ERRORS.labels(worker=w, stage=stage)
        for counter in (metrics.MODEL_ERRORS, metrics.MAYBE_DUPLICATES):
            counter.labels(worker=w)
        metrics.MODEL_UP.labels(worker=w).set(1)

    # -- the batch -----------------------------------------------------------------------
    def process(self, records: Sequence[Record],
                maybe_duplicate: Callable[[Record], bool] = lambda _r: False) -> list[Outbound]:
        """Every output the batch owes, in record order. Raises ModelUnavailable or
        BatchAbandoned (then nothing was decided and nothing may be committed)."""
        valid: list[tuple[int, Record, FrameMeta, np.ndarray]] = []
        invalid: list[tuple[int, Record, WireError]] = []
        with self.clock("decode"):
            self._decode(records, valid, invalid)
        streams = [(m.line, m.camera) for _, _, m, _ in valid] if self._streams else None
        with self.clock("score"):
            results = self._score_all([rgb for *_, rgb in valid], streams)  # may raise: nothing counted yet
        self.stats.received += len(records)
        metrics.FRAMES_RECEIVED.labels(worker=self.worker_id).inc(len(records))
        by_record = {i: [self._dead(rec, err)] for i, rec, err in invalid}
        decided_ns = time.time_ns()
        remember: list[ScoreResult] = []  # zero-shot: frames for their camera's bank
        observed: list[tuple[tuple[str, str, str], float]] = []  # and scores for its thresholds
        for (i, rec, meta, rgb), res in zip(valid, results, strict=True):
            if isinstance(res, BaseException):
                by_record[i] = [self._dead(rec, WireError(
                    "scoring_failed", f"the model failed on this frame alone, {JUDGE_ROUNDS} times "
                    f"while it scored a known-good image: {type(res).__name__}: {res}"))]
            else:
                th = self._thresholds_for(meta, res)
                by_record[i], routed = self._route(rec, meta, rgb, res, decided_ns, maybe_duplicate(rec), th)
                if not routed:  # dead-lettered: it may be replayed, and must not meet itself
                    continue
                if streams is not None and th.decide(res.score_without_bank) != "alert":
                    # the bank is what normal looks like: an alert stays out, and so does a frame
                    # that only the bank let pass (else a recurring defect would vouch for itself)
                    remember.append(res)
                if self.stream_thresholds is not None and res.mode not in (None, "warm-up"):
                    observed.append(((meta.line, meta.camera, res.mode), res.score))  # type: ignore[arg-type]
        self._uncommitted = (remember, observed)
        self._unpublished = True
        self.publish_drift()
        return [o for i in sorted(by_record) for o in by_record[i]]

    def publish_drift(self) -> None:
        """Summarise the drift windows for /metrics when frames came since the last time and
        ``DRIFT_PUBLISH_S`` passed (the worker also calls this between batches, so a camera's
        last frames are published even when no batch follows)."""
        if (self.drift is None or not self._unpublished
                or time.monotonic() - self._drift_published < DRIFT_PUBLISH_S):
            return
        with self.clock("drift"):
            metrics.publish_drift(self.drift)
        self._drift_published, self._unpublished = time.monotonic(), False

    def _decode(self, records: Sequence[Record], valid: list, invalid: list) -> None:
        for i, rec in enumerate(records):
            try:
                meta, rgb = decode_frame(rec.headers, rec.value, self.max_frame_bytes, self.max_pixels)
                valid.append((i, rec, meta, rgb))
            except WireError as err:
                invalid.append((i, rec, err))
            except MemoryError:
                raise
            except Exception as exc:  # a gap in the checks must still end as a dead letter
                invalid.append((i, rec, WireError("not_an_image", f"unreadable record: "
                                                                  f"{type(exc).__name__}: {exc}")))

    # -- zero-shot: per-camera banks and thresholds ----------------------------------------
    @property
    def _streams(self) -> bool:
        """Whether the scorer scores each camera's frames against that camera's own frames
        (mutual scoring; patch-knn with --stream-bank)."""
        return bool(getattr(self.scorer, "per_camera", False))

    def _thresholds_for(self, meta: FrameMeta, res: ScoreResult) -> Thresholds:
        """The thresholds that decide this frame: the worker's, or, zero-shot before
        calibration, its camera's own (per scoring mode, as modes score on different
        scales); during a warm-up every frame goes to review."""
        if self.stream_thresholds is None or res.mode is None:
            return self.thresholds
        key = (meta.line, meta.camera, res.mode)
        th = None if res.mode == "warm-up" else self.stream_thresholds.thresholds(key)
        return th or WARM_UP

    def committed(self) -> None:
        """The last processed batch is committed: its frames join their cameras' banks and its
        scores their thresholds' windows (before, a batch read again would meet itself)."""
        remember, observed = self._uncommitted
        self._uncommitted = ([], [])
        if remember and self._streams:
            self.scorer.admit(remember)  # type: ignore[attr-defined]
        if self.stream_thresholds is not None:
            for key, score in observed:
                self.stream_thresholds.observe(key, score)

    def abandoned(self) -> None:
        """The last processed batch will be read again: it leaves no trace in banks or windows."""
        self._uncommitted = ([], [])

    def forget_streams(self, cameras: Sequence[tuple[str, str]]) -> None:
        """Drop silent cameras' banks and score windows (a camera that comes back warms up)."""
        if self._streams:
            self.scorer.forget(list(cameras))  # type: ignore[attr-defined]
        if self.stream_thresholds is not None:
            for line, camera in cameras:
                for mode in MUTUAL_MODES:
                    self.stream_thresholds.forget((line, camera, mode))

    # -- scoring, with retries -----------------------------------------------------------
    def _call(self, images: list[np.ndarray], streams: list | None = None) -> list[ScoreResult]:
        t0 = time.perf_counter()
        out = list(self.scorer.score(images) if streams is None
                   else self.scorer.score(images, streams))  # type: ignore[call-arg]
        if len(out) != len(images):
            raise RuntimeError(f"the scorer returned {len(out)} results for {len(images)} frames")
        bad = [r.score for r in out if not math.isfinite(r.score)]
        if bad:
            raise FloatingPointError(f"the scorer returned a non-finite score ({bad[0]})")
        metrics.SCORING_SECONDS.labels(worker=self.worker_id).observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.labels(worker=self.worker_id).observe(len(images))
        return out

    def _try(self, images: list[np.ndarray], streams: list | None) -> list[ScoreResult] | BaseException:
        """Up to ``retry.attempts`` calls with backoff: the results, or the last error."""
        err: BaseException | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                self.pause(self.retry.delay(attempt - 1))
            try:
                return self._call(images, streams)
            except Exception as exc:  # a model failure must not kill the worker or lose frames
                err = exc
                metrics.MODEL_ERRORS.labels(worker=self.worker_id).inc()
                log.warning("scoring %d frame(s) failed (attempt %d of %d): %s: %s", len(images),
                            attempt + 1, self.retry.attempts, type(exc).__name__, exc)
        assert err is not None
        return err

    def _model_works(self, like: np.ndarray) -> bool:
        """Whether the model scores a known-good image: a reference; for scorers without
        references (zero-shot) the last frame it scored; before any, a uniform grey frame the
        size of ``like`` (any model must score that)."""
        probe = self.probe if self.probe is not None else self._last_good
        if probe is None:
            probe = np.full_like(like, 128)
        try:
            self._call([probe])
            return True
        except Exception as exc:
            log.error("the model fails on a known-good image too (%s: %s)", type(exc).__name__, exc)
            return False

    def _unavailable(self, err: BaseException) -> ModelUnavailable:
        metrics.MODEL_UP.labels(worker=self.worker_id).set(0)
        return ModelUnavailable(f"{type(err).__name__}: {err}")

    def _score_all(self, images: list[np.ndarray],
                   streams: list | None = None) -> list[ScoreResult | BaseException]:
        """``streams``: each frame's (line, camera), for scorers with per-camera banks."""
        if not images:
            return []
        first = self._try(images, streams)
        if not isinstance(first, BaseException):
            metrics.MODEL_UP.labels(worker=self.worker_id).set(1)
            self._last_good = images[-1]
            return list(first)
        if not self._model_works(images[0]):
            raise self._unavailable(first)
        out = (self._split(images, streams) if len(images) > 1
               else [self._alone(images[0], first, model_checked=True, stream=streams)])
        metrics.MODEL_UP.labels(worker=self.worker_id).set(1)
        return out

    def _split(self, images: list[np.ndarray], streams: list | None) -> list[ScoreResult | BaseException]:
        """Halves, each tried again, down to single frames: only culprits stay failed."""
        half = len(images) // 2
        out: list[ScoreResult | BaseException] = []
        for lo, hi in ((0, half), (half, len(images))):
            part, keys = images[lo:hi], None if streams is None else streams[lo:hi]
            got = self._try(part, keys)
            if not isinstance(got, BaseException):
                out.extend(got)
            elif len(part) == 1:
                out.append(self._alone(part[0], got, stream=keys))
            else:
                out.extend(self._split(part, keys))
        return out

    def _alone(self, image: np.ndarray, err: BaseException, model_checked: bool = False,
               stream: list | None = None) -> ScoreResult | BaseException:
        """A frame that failed alone is the culprit only if it keeps failing while the model,
        checked each time, scores a known-good image: ``JUDGE_ROUNDS`` rounds, with backoff,
        so a burst of device errors never becomes a verdict on healthy frames.
        ``model_checked``: the caller checked the model just now (round 0 need not again)."""
        for round_ in range(JUDGE_ROUNDS):
            if not (round_ == 0 and model_checked) and not self._model_works(image):
                raise self._unavailable(err)  # the model broke, not this frame
            if round_ == JUDGE_ROUNDS - 1:
                return err
            self.pause(self.retry.delay(round_ + 1))
            got = self._try([image], stream)
            if not isinstance(got, BaseException):
                return got[0]
            err = got
        return err

    # -- routing, one frame at a time ----------------------------------------------------
    def _describe(self, crop: np.ndarray) -> str | None:
        assert self.describe is not None
        try:
            return self.describe(crop)
        except Exception as exc:
            metrics.FRAME_ERRORS.labels(worker=self.worker_id, stage="explain").inc()
            log.warning("defect words failed for one frame (%s: %s); explained without them",
                        type(exc).__name__, exc)
            return None

    def _route(self, rec: Record, meta: FrameMeta, rgb: np.ndarray, res: ScoreResult,
               decided_ns: int, maybe_dup: bool, th: Thresholds) -> tuple[list[Outbound], bool]:
        """The frame's outputs, and whether it was routed (False: dead-lettered
        ``processing_failed``, so it leaves no trace in drift, banks or thresholds)."""
        with self.clock("route"):
            outs, tracked = self._route_one(rec, meta, rgb, res, decided_ns, maybe_dup, th)
        if self.drift is not None and tracked:  # cameras over the limit have no drift window
            with self.clock("drift"):
                self._observe_drift(meta, res, rgb)
        return outs, tracked is not None

    def _route_one(self, rec: Record, meta: FrameMeta, rgb: np.ndarray, res: ScoreResult,
                   decided_ns: int, maybe_dup: bool, th: Thresholds) -> tuple[list[Outbound], bool | None]:
        """The frame's outputs and whether its camera is counted (None: dead-lettered)."""
        ref = FrameRef(rec.topic, rec.partition, rec.offset)
        args = (meta, ref, rgb, res, th, self.topics, self.scorer.name,
                self.worker_id, decided_ns)
        try:
            score, outs = route(*args, describe=self._describe if self.describe else None,
                                maybe_duplicate=maybe_dup)
        except Exception as exc:
            metrics.FRAME_ERRORS.labels(worker=self.worker_id, stage="routing").inc()
            log.exception("routing %s (%s) failed (%s); routing it without explanation",
                          meta.frame_id, ref, exc)
            try:
                score, outs = route(*args, explain=False, maybe_duplicate=maybe_dup)
            except Exception as again:
                return [self._dead(rec, WireError("processing_failed",
                                                  f"{type(again).__name__}: {again}"))], None
        return outs, self._count(meta, score.decision, score.latency_s, res.score, maybe_dup,
                                 None if th is WARM_UP else res.mode)

    def _observe_drift(self, meta: FrameMeta, res: ScoreResult, rgb: np.ndarray) -> None:
        try:
            # on the scale of the calibration frames it compares with (a bank lowers live scores)
            self.drift.observe(meta.line, meta.camera, res.score_without_bank, rgb,  # type: ignore[union-attr]
                               res.embedding)
        except Exception as exc:
            metrics.FRAME_ERRORS.labels(worker=self.worker_id, stage="drift").inc()
            log.warning("drift statistics failed for %s (%s: %s); frame routed, not observed",
                        meta.frame_id, type(exc).__name__, exc)

    def _count(self, meta: FrameMeta, decision: str, latency_s: float, score: float,
               maybe_dup: bool, mode: str | None) -> bool:
        """Count a routed frame; False when its camera is over the limit (counted as _other).
        ``mode``: how a zero-shot scorer scored it (None: a warm-up's thresholds decided)."""
        tracked = self.cameras.admit(meta.line, meta.camera)
        line, camera = tracked or (metrics.OVERFLOW, metrics.OVERFLOW)
        if tracked and self._streams and hasattr(self.scorer, "mode"):  # scorers with scoring modes
            shown = mode or "warm-up"
            for m in MUTUAL_MODES:
                metrics.SCORING_MODE.labels(line=line, camera=camera, mode=m).set(m == shown)
        self.stats.scored += 1
        metrics.FRAMES_SCORED.labels(line=line, camera=camera, decision=decision).inc()
        metrics.END_TO_END_SECONDS.labels(line=line, camera=camera).observe(max(0.0, latency_s))
        metrics.ANOMALY_SCORE.labels(line=line, camera=camera).observe(score)
        if decision == "alert":
            self.stats.alerts += 1
            metrics.ALERTS.labels(line=line, camera=camera).inc()
        elif decision == "review":
            self.stats.reviews += 1
            metrics.REVIEW_ITEMS.labels(line=line, camera=camera).inc()
        if maybe_dup:
            self.stats.maybe_duplicates += 1
            metrics.MAYBE_DUPLICATES.labels(worker=self.worker_id).inc()
        return tracked is not None

    def _dead(self, rec: Record, err: WireError) -> Outbound:
        self.stats.dead_letters += 1
        metrics.DEAD_LETTERS.labels(worker=self.worker_id, reason=err.reason,
                                    cause=dead_letter_cause(err.reason)).inc()
        log.warning("dead-lettering %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, err)
        return dead_letter(self.topics.deadletter, rec.key, rec.value, rec.headers, err,
                           FrameRef(rec.topic, rec.partition, rec.offset), self.worker_id,
                           self.max_frame_bytes)
