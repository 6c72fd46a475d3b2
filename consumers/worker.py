"""The scoring worker: one member of a Kafka consumer group.

The loop, for each micro-batch (up to ``max_batch`` frames or ``max_wait_ms``):

1. decode and validate every record (invalid ones become dead letters);
2. score the valid frames in one model call;
3. route: every frame to ``.scores``, alerts and review items to theirs;
4. **flush** the producer and check that every output was acknowledged;
5. only then **commit** the batch's offsets, per (topic, partition).

A crash anywhere before step 5 means the batch is read again by whoever owns
the partitions next: at-least-once, so a frame can be scored twice (bounded
by the batch in flight) but never lost. Dead-letter records count as outputs:
a bad frame is only committed once its dead letter is safely in Kafka.

Stopping (SIGTERM/Ctrl-C) finishes the batch in hand, commits and leaves the
group. When a rebalance takes partitions away, the batch in hand is finished
and committed before they go, so the next owner does not redo it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consumers.decode import decode_frame
from consumers.labels import LabelFollower, ReferenceLearner
from consumers.profiles import LoadedProfile, ProfileWatcher
from consumers.routing import Outbound, dead_letter, route
from inference.calibration import Thresholds
from inference.scoring import Scorer, ScoreResult
from linewatch.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    DL_REASONS,
    FrameMeta,
    FrameRef,
    Topics,
    WireError,
)
from monitoring import metrics
from monitoring.drift import DriftMonitor

log = logging.getLogger(__name__)


class DeliveryFailed(RuntimeError):
    """An output record was not acknowledged; the batch must not be committed."""


class CommitRefused(RuntimeError):
    """The group no longer lets us commit (we were rebalanced out); the batch will be re-read."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerConfig:
    bootstrap: str
    thresholds: Thresholds
    topics: Topics = field(default_factory=Topics)
    group_id: str = "linewatch-workers"
    worker_id: str = field(default_factory=default_worker_id)
    max_batch: int = 8
    max_wait_ms: int = 20
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    # kafka-python's 45 s default session means 45 s of a dead worker's partitions
    # going unscored; 10 s still tolerates a slow batch (heartbeats run in a thread).
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 2_000
    exit_when_idle_s: float | None = None
    ready_file: str | None = None


@dataclass
class WorkerStats:
    received: int = 0
    scored: int = 0
    dead_letters: int = 0
    alerts: int = 0
    reviews: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0


class Worker:
    """Consume frames, score, route, flush, commit. See the module docstring for the order."""

    def __init__(self, cfg: WorkerConfig, scorer: Scorer, drift: DriftMonitor | None = None,
                 learner: ReferenceLearner | None = None, watcher: ProfileWatcher | None = None,
                 describe: Callable[[np.ndarray], str] | None = None,
                 info: dict[str, str] | None = None) -> None:
        """``describe`` names what a flagged region looks like (CLIP defect words); ``info`` is
        published as ``linewatch_worker_info`` and its ``profile`` follows profile reloads."""
        from kafka import KafkaConsumer, KafkaProducer

        self.cfg = cfg
        self.scorer = scorer
        self.drift = drift
        self.learner = learner
        self.watcher = watcher
        self.labels: LabelFollower | None = None
        self.describe = describe
        self.info = dict(info or {})
        if self.info:
            metrics.WORKER_INFO.info(self.info)
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._pending: list[Any] = []
        self._ready_written = False
        self._seen_cameras: set[tuple[str, str]] = set()
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
            group_id=cfg.group_id,
            client_id=f"linewatch-worker-{cfg.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.max_batch,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            fetch_max_bytes=max(52_428_800, cfg.max_frame_bytes * 2),
            max_partition_fetch_bytes=max(1_048_576, cfg.max_frame_bytes + 65_536),
            # the default 500 ms fetch wait would add up to half a second to every decision
            fetch_max_wait_ms=50,
        )
        self.producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap,
            client_id=f"linewatch-worker-out-{cfg.worker_id}",
            acks="all",
            linger_ms=2,
            retries=5,
            max_request_size=cfg.max_frame_bytes + 256 * 1024,
        )
        w = cfg.worker_id
        # rare events start at 0, so rate() and dashboards see "none" rather than "no data"
        for reason in DL_REASONS:
            metrics.DEAD_LETTERS.labels(worker=w, reason=reason)
        for counter in (metrics.COMMIT_FAILURES, metrics.DELIVERY_RETRIES, metrics.FRAMES_RECEIVED):
            counter.labels(worker=w)
        metrics.THRESHOLD.labels(worker=w, kind="alert").set(cfg.thresholds.alert)
        metrics.THRESHOLD.labels(worker=w, kind="review").set(cfg.thresholds.review)

    # -- control -------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit and exit (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> WorkerStats:
        from kafka import ConsumerRebalanceListener

        worker = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                if worker._pending:
                    log.info("partitions %s revoked: finishing the batch in hand first",
                             sorted(tp.partition for tp in revoked))
                    worker._process_pending()
                for tp in revoked:  # the new owner reports these from now on
                    metrics.remove_series(metrics.COMMITTED_OFFSET, tp.topic, str(tp.partition))

            def on_partitions_assigned(self, assigned: Any) -> None:
                log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
                worker._write_ready()

        if self.learner is not None:
            self.labels = LabelFollower(self.cfg.bootstrap, self.cfg.topics.labels)
            self._replay_labels()
        self.consumer.subscribe([self.cfg.topics.frames], listener=_Listener())
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.watcher is not None and (fresh := self.watcher.poll()) is not None:
                    self._swap_profile(fresh)  # between batches: no frame sees half a profile
                if self.labels is not None:
                    self._apply_labels(self.labels.poll(0))
                self._fill_batch()
                if self._pending:
                    self._process_pending()
                    idle_since = time.monotonic()
                elif (self.cfg.exit_when_idle_s is not None
                      and time.monotonic() - idle_since > self.cfg.exit_when_idle_s):
                    log.info("no frames for %.1fs: exiting", self.cfg.exit_when_idle_s)
                    break
            if self._pending:  # stop requested mid-batch: drain what we hold
                self._process_pending()
        finally:
            self._close()
        return self.stats

    # -- profile reloads -------------------------------------------------------
    def _swap_profile(self, new: LoadedProfile) -> None:
        if self.learner is not None:  # operator-confirmed normals stay learned across reloads
            self.learner.scorer, self.learner.references = new.scorer, list(new.references)
            if self.learner.learned:
                new.scorer.add_normals([im for _, im in self.learner.learned])
        self.scorer = new.scorer
        if new.drift is not None:
            self.drift = new.drift
        self._set_thresholds(new.thresholds)
        metrics.REFERENCE_IMAGES.labels(worker=self.cfg.worker_id).set(len(new.references))
        metrics.PROFILE_RELOADS.labels(worker=self.cfg.worker_id).inc()
        if self.info:
            self.info["profile"] = new.fingerprint[:12]
            metrics.WORKER_INFO.info(self.info)
        log.info("profile %s in use: alert %.4f, review %.4f", new.fingerprint[:12],
                 new.thresholds.alert, new.thresholds.review)

    def _set_thresholds(self, th: Thresholds) -> None:
        w = self.cfg.worker_id
        self.cfg.thresholds = th
        metrics.THRESHOLD.labels(worker=w, kind="alert").set(th.alert)
        metrics.THRESHOLD.labels(worker=w, kind="review").set(th.review)
        if getattr(self.scorer, "map_gate", None) is not None:
            self.scorer.map_gate = th.review  # type: ignore[attr-defined]

    # -- operator verdicts ----------------------------------------------------
    def _replay_labels(self) -> None:
        """Apply every verdict already on ``.labels`` before scoring (the memory survives restarts)."""
        assert self.labels is not None
        quiet = 0
        while quiet < 2 and not self._stop.is_set():
            got = self.labels.poll(500)
            quiet = 0 if got else quiet + 1
            self._apply_labels(got)

    def _apply_labels(self, labels: list) -> None:
        if not labels or self.learner is None:
            return
        res = self.learner.apply(labels)
        if res.thresholds is None:
            return
        th = res.thresholds
        log.info("recalibrated after %d learned normal(s): alert %.4f -> %.4f, review %.4f -> %.4f",
                 res.added, self.cfg.thresholds.alert, th.alert, self.cfg.thresholds.review, th.review)
        self._set_thresholds(th)
        if self.drift is not None and res.holdout_scores is not None:
            self.drift.rebase_scores(res.holdout_scores)

    # -- the batch -----------------------------------------------------------
    def _fill_batch(self) -> None:
        """Poll until the batch is full, ``max_wait_ms`` passed since its first frame, or stop."""
        first_deadline: float | None = None
        while len(self._pending) < self.cfg.max_batch and not self._stop.is_set():
            if first_deadline is None:
                timeout_ms = 200  # idle: wake up regularly to notice a stop request
            else:
                timeout_ms = int((first_deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    return
            got = self.consumer.poll(timeout_ms=timeout_ms,
                                     max_records=self.cfg.max_batch - len(self._pending))
            for records in got.values():
                self._pending.extend(records)
            if self._pending and first_deadline is None:
                first_deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            if not self._pending:
                return

    def _process_pending(self) -> None:
        batch, self._pending = self._pending, []
        outputs = self._score_and_route(batch)  # scored once; a retry only re-sends
        attempt = 0
        while True:
            try:
                self._send_and_flush(outputs)  # step 1: outputs are in Kafka
                break
            except DeliveryFailed as exc:
                attempt += 1
                metrics.DELIVERY_RETRIES.labels(worker=self.cfg.worker_id).inc()
                if self._stop.is_set() and attempt >= 3:
                    log.error("giving up on a batch while stopping (%s); not committing it, so "
                              "the next owner of its partitions will score it", exc)
                    return
                backoff = min(10.0, 0.5 * 2 ** attempt)
                log.error("outputs not delivered (%s); retrying the batch in %.1fs", exc, backoff)
                time.sleep(backoff)
        try:
            self._commit(batch)  # step 2: only now are the input offsets released
        except CommitRefused as exc:
            log.warning("%s", exc)

    def _score_and_route(self, batch: Sequence[Any]) -> list[Outbound]:
        cfg, w = self.cfg, self.cfg.worker_id
        self.stats.batches += 1
        self.stats.received += len(batch)
        metrics.FRAMES_RECEIVED.labels(worker=w).inc(len(batch))
        valid: list[tuple[Any, FrameMeta, np.ndarray]] = []
        outputs: list[Outbound] = []
        for rec in batch:
            try:
                meta, rgb = decode_frame(rec.headers, rec.value, cfg.max_frame_bytes, cfg.max_pixels)
                valid.append((rec, meta, rgb))
            except WireError as err:
                outputs.append(self._dead(rec, err))
        results = self._score([rgb for _, _, rgb in valid])
        decided_ns = time.time_ns()
        for (rec, meta, rgb), res in zip(valid, results, strict=True):
            if isinstance(res, WireError):
                outputs.append(self._dead(rec, res))
                continue
            score, outs = route(meta, self._ref(rec), rgb, res, cfg.thresholds, cfg.topics,
                                self.scorer.name, w, decided_ns, self.describe)
            outputs.extend(outs)
            self._count(meta, score.decision, score.latency_s, res.score)
            if self.drift is not None:
                self.drift.observe(meta.line, meta.camera, res.score, rgb, res.embedding)
        if self.drift is not None:
            metrics.publish_drift(self.drift)
        return outputs

    def _score(self, images: list[np.ndarray]) -> list[ScoreResult | WireError]:
        """Score the batch; if the batch fails, score frames one by one to isolate the culprit."""
        if not images:
            return []
        t0 = time.perf_counter()
        try:
            out: list[ScoreResult | WireError] = list(self.scorer.score(images))
        except Exception as exc:  # a model failure must not kill the worker or lose frames
            log.exception("scoring a batch of %d failed (%s); scoring frames one by one",
                          len(images), exc)
            out = []
            for im in images:
                try:
                    out.append(self.scorer.score([im])[0])
                except Exception as one:
                    out.append(WireError("scoring_failed", f"{type(one).__name__}: {one}"))
        metrics.SCORING_SECONDS.labels(worker=self.cfg.worker_id).observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.labels(worker=self.cfg.worker_id).observe(len(images))
        return out

    def _dead(self, rec: Any, err: WireError) -> Outbound:
        self.stats.dead_letters += 1
        metrics.DEAD_LETTERS.labels(worker=self.cfg.worker_id, reason=err.reason).inc()
        log.warning("dead-lettering %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, err)
        return dead_letter(self.cfg.topics.deadletter, rec.key, rec.value, rec.headers, err,
                           self._ref(rec), self.cfg.worker_id, self.cfg.max_frame_bytes)

    @staticmethod
    def _ref(rec: Any) -> FrameRef:
        return FrameRef(rec.topic, rec.partition, rec.offset)

    def _count(self, meta: FrameMeta, decision: str, latency_s: float, score: float) -> None:
        lc = {"line": meta.line, "camera": meta.camera}
        if (meta.line, meta.camera) not in self._seen_cameras:  # start this camera's counters at 0
            self._seen_cameras.add((meta.line, meta.camera))
            for d in ("normal", "review", "alert"):
                metrics.FRAMES_SCORED.labels(**lc, decision=d)
            metrics.ALERTS.labels(**lc)
            metrics.REVIEW_ITEMS.labels(**lc)
        self.stats.scored += 1
        metrics.FRAMES_SCORED.labels(**lc, decision=decision).inc()
        metrics.END_TO_END_SECONDS.labels(**lc).observe(max(0.0, latency_s))
        metrics.ANOMALY_SCORE.labels(**lc).observe(score)
        if decision == "alert":
            self.stats.alerts += 1
            metrics.ALERTS.labels(**lc).inc()
        elif decision == "review":
            self.stats.reviews += 1
            metrics.REVIEW_ITEMS.labels(**lc).inc()

    def _send_and_flush(self, outputs: list[Outbound]) -> None:
        futures = [self.producer.send(o.topic, key=o.key, value=o.value, headers=o.headers)
                   for o in outputs]
        self.producer.flush(timeout=30)
        failed = []
        for f in futures:
            if not f.is_done:
                failed.append("not acknowledged within 30s")
            elif f.failed():
                failed.append(repr(f.exception))
        if failed:
            raise DeliveryFailed(f"{len(failed)} of {len(futures)} outputs failed: {failed[0]}")

    def _commit(self, batch: Sequence[Any]) -> None:
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        nxt: dict[TopicPartition, int] = {}
        for rec in batch:
            tp = TopicPartition(rec.topic, rec.partition)
            nxt[tp] = max(nxt.get(tp, 0), rec.offset + 1)
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in nxt.items()}
        try:
            self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            self.stats.commit_failures += 1
            metrics.COMMIT_FAILURES.labels(worker=self.cfg.worker_id).inc()
            raise CommitRefused(f"commit of {len(batch)} frames refused ({exc}); the new owner "
                                "of those partitions will score them again") from exc
        self.stats.commits += 1
        metrics.COMMITS.labels(worker=self.cfg.worker_id).inc()
        for tp, o in nxt.items():
            metrics.COMMITTED_OFFSET.labels(topic=tp.topic, partition=str(tp.partition)).set(o)

    def _write_ready(self) -> None:
        if self.cfg.ready_file and not self._ready_written:
            Path(self.cfg.ready_file).write_text(f"{os.getpid()}\n")
            self._ready_written = True

    def _close(self) -> None:
        if self.labels is not None:
            self.labels.close()
        try:
            self.producer.flush(timeout=30)
            self.producer.close(timeout=10)
        finally:
            self.consumer.close(autocommit=False)  # leave the group now: fast handover
