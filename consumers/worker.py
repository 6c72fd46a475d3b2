"""The scoring worker's Kafka loop: one member of a consumer group.

Each micro-batch (up to ``max_batch`` frames, or ``max_wait_ms`` after the first)
goes through three ordered steps; the next starts only when the last succeeded:
1. **decide** every frame (:mod:`consumers.process`): scored and routed, or
   dead-lettered with a reason; 2. **deliver** every output and check that Kafka
acknowledged each (:mod:`consumers.delivery`); 3. **commit** the batch's offsets,
per (topic, partition). A crash before step 3 means the batch is read again by
the partitions' next owner: at-least-once, never lost. Only then (a zero-shot
scorer) do the frames join their cameras' banks, so a batch read again never
meets itself there. A failure that is not the
frame's fault (the model, the broker) never turns into a dead letter.

**Rebalances.** kafka-python runs rebalance listeners on its network thread, where
nothing may block, so the listener only records revoked/assigned partitions and the
loop applies that after each ``poll``. Fetched, unprocessed records of a revoked
partition are dropped (uncommitted: the new owner reads them). The loop polls only
between batches, or while a batch waits for a retry (with its partitions paused, so
the worker stays in the group); a batch whose partitions are revoked meanwhile is
abandoned uncommitted. Outputs delivered by a batch whose commit was then refused are
remembered per partition and skipped (and committed) if the partition comes back.

**Duplicates are marked.** The first ``max_batch`` records read from a partition that
was not this worker's before are scored with ``maybe_duplicate=true``: the previous
owner may have delivered their outputs and died before committing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from consumers.beliefs import Beliefs
from consumers.config import (
    EveryMinute,
    Rebalances,
    WorkerConfig,
    WorkerStats,
    kafka_clients,
    rebalance_listener,
)
from consumers.delivery import Delivery
from consumers.labels import ReferenceLearner
from consumers.process import BatchAbandoned, FrameProcessor, ModelUnavailable
from consumers.profiles import ProfileWatcher
from consumers.routing import Outbound
from inference.calibration import StreamThresholds
from inference.scoring import Scorer
from monitoring import metrics
from monitoring.drift import DriftMonitor

log = logging.getLogger(__name__)


class Worker:
    """Consume frames, decide, deliver, commit. See the module docstring for the order."""

    def __init__(self, cfg: WorkerConfig, scorer: Scorer, drift: DriftMonitor | None = None,
                 learner: ReferenceLearner | None = None, watcher: ProfileWatcher | None = None,
                 describe: Callable[[np.ndarray], str] | None = None,
                 info: dict[str, str] | None = None, probe: np.ndarray | None = None,
                 label_key: bytes | None = None, stream_thresholds: StreamThresholds | None = None
                 ) -> None:
        """``describe`` names what a flagged region looks like (CLIP defect words); ``info`` is
        published as ``linewatch_worker_info`` and its ``profile`` follows profile reloads;
        ``probe`` is a reference image that tells a broken model from a poisonous frame;
        ``label_key`` verifies operators' labels (needed with a ``learner``);
        ``stream_thresholds``: a zero-shot scorer's uncalibrated per-camera thresholds."""
        if learner is not None and label_key is None:
            raise ValueError("learning from labels needs the label-signing key")
        if cfg.thresholds is None:
            raise ValueError("WorkerConfig.thresholds is not set (consumers.assembly.build_worker sets it)")
        self.cfg = cfg
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._rebalances = Rebalances()
        self._pending: list[Any] = []  # fetched, not yet in a batch
        self._batch_tps: set[Any] = set()  # partitions of the batch in hand
        self._batch_revoked = False
        self._stopping_since: float | None = None
        self._owned: set[Any] = set()
        self._kept: set[Any] = set()  # revoked in this rebalance: ours again if reassigned
        self._window: dict[Any, int | None] = {}  # partition -> end of its maybe-duplicate window
        self._delivered: dict[Any, int] = {}  # partition -> next offset delivered, not committed
        self._rewind: dict[Any, int] = {}  # partition -> earliest offset given up, to read again
        self._ready_written = False
        self._say = {k: EveryMinute() for k in ("model", "commit", "poll")}
        w = cfg.worker_id
        self.cameras = metrics.CameraSeries(w, cfg.max_cameras, cfg.camera_idle_s,
                                            on_forget=self._forget_cameras)
        self.processor = FrameProcessor(scorer, cfg.thresholds, cfg.topics, w, cfg.max_frame_bytes,
                                        cfg.max_pixels, self.cameras, describe, drift, probe,
                                        cfg.retry, pause=self._pause,
                                        stream_thresholds=stream_thresholds)
        self.stats.frames = self.processor.stats
        self.consumer, self.producer = kafka_clients(cfg)
        self.delivery = Delivery(self.producer, w, cfg.delivery_timeout_ms / 1000 + 5)
        for counter in (metrics.COMMIT_FAILURES, metrics.DELIVERY_RETRIES, metrics.FRAMES_RECEIVED):
            counter.labels(worker=w)
        for topic in (cfg.topics.scores, cfg.topics.alerts, cfg.topics.review, cfg.topics.deadletter):
            metrics.OUTPUT_BLOCKED.labels(worker=w, topic=topic).set(0)
        self.beliefs = Beliefs(cfg, self.processor, learner, watcher, label_key, info)

    # -- what the loop uses elsewhere ------------------------------------------------------
    @property
    def scorer(self) -> Scorer:
        return self.processor.scorer

    @property
    def drift(self) -> DriftMonitor | None:
        return self.processor.drift

    def request_stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit and exit (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> WorkerStats:
        self.beliefs.start(self._stop)
        self.consumer.subscribe([self.cfg.topics.frames], listener=rebalance_listener(self._rebalances))
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                self._between_batches()
                batch = self._fill_batch()
                if batch:
                    self._handle(batch)
                    idle_since = time.monotonic()
                elif (self.cfg.exit_when_idle_s is not None
                      and time.monotonic() - idle_since > self.cfg.exit_when_idle_s):
                    log.info("no frames for %.1fs: exiting", self.cfg.exit_when_idle_s)
                    break
        finally:  # records fetched but not in a batch are uncommitted: the next owner reads them
            self._close()
        return self.stats

    def _between_batches(self) -> None:
        """Profile swaps, operators' verdicts and idle cameras: never inside a batch."""
        with self.processor.clock("learn"):
            self.beliefs.update()
        self.processor.publish_drift()
        self.cameras.expire()
        if self._owned & self._delivered.keys():  # skipped re-deliveries: commit them now
            with contextlib.suppress(BatchAbandoned):
                self._commit_offsets({})

    def _fill_batch(self) -> list[Any]:
        """Poll until a batch is full, ``max_wait_ms`` passed since its first frame, or stop."""
        first_deadline: float | None = None
        while len(self._pending) < self.cfg.max_batch and not self._stop.is_set():
            if first_deadline is None:
                timeout_ms = 0 if self._pending else 200  # idle: wake up to notice a stop
            else:
                timeout_ms = int((first_deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
            had = len(self._pending)
            self._poll(timeout_ms, self.cfg.max_batch - len(self._pending))
            if self._pending and first_deadline is None:
                first_deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            if not self._pending or (timeout_ms == 0 and len(self._pending) == had):
                break
        batch, self._pending = self._pending[: self.cfg.max_batch], self._pending[self.cfg.max_batch:]
        return batch

    def _poll(self, timeout_ms: int, max_records: int, timed: bool = True) -> None:
        """One poll; rebalance events applied before its records join ``_pending``. ``timed``:
        counted as the 'poll' step (not while a step waits in :meth:`_pause`, whose time is
        that step's)."""
        from kafka.errors import KafkaError

        try:
            with self.processor.clock("poll") if timed else contextlib.nullcontext():
                got = self.consumer.poll(timeout_ms=max(0, timeout_ms), max_records=max(1, max_records))
        except (KafkaError, ValueError) as exc:
            # the client retries connections itself. A ValueError is a record kafka-python
            # cannot parse (a header key that is not UTF-8, which no standard client writes):
            # it raises at that record on every poll, so the worker cannot get past it or
            # dead-letter it; it stays up and says so once a minute (README: Reliability)
            if self._say["poll"].due():
                log.error("polling for frames failed (%s: %s); retrying", type(exc).__name__, exc)
            self._stop.wait(0.5)
            got = {}
        rewound = self._apply_rebalances()
        for tp, records in got.items():
            if tp not in self._owned or tp in rewound:  # rewound: read again from the seek
                continue
            done = self._delivered.get(tp)
            for rec in records:
                if done is not None and rec.offset < done:
                    self.stats.skipped_redeliveries += 1  # our outputs for it were delivered
                    continue
                self._pending.append(rec)

    def _apply_rebalances(self) -> set[Any]:
        """Apply what the listener recorded; returns the partitions rewound by a seek."""
        revoked, lost, assigned = self._rebalances.take()
        gone = revoked | lost
        if gone:
            for rec in self._pending:
                if _tp(rec) in gone:
                    self._give_up(rec)
            self._pending = [r for r in self._pending if _tp(r) not in gone]
            if self._batch_tps & gone:
                self._batch_revoked = True
            for tp in gone:
                self._window.pop(tp, None)
                metrics.remove_series(metrics.COMMITTED_OFFSET, tp.topic, str(tp.partition))
            self._owned -= gone
            self._kept = (self._kept | revoked) - lost  # lost ones may already be someone's
            self._delivered = {tp: o for tp, o in self._delivered.items() if tp not in lost}
            log.info("partitions %s revoked%s", sorted(tp.partition for tp in gone),
                     f" ({len(lost)} lost)" if lost else "")
        rewound: set[Any] = set()
        if assigned:
            for tp in assigned - self._kept:  # another member may have scored past its commit
                self._window[tp] = None
                self._rewind.pop(tp, None)  # fresh state: it starts from the committed offset
                # another member may have committed past what we delivered: never commit back
                self._delivered.pop(tp, None)
            # a partition we kept keeps its position, past records we gave up: read them again
            for tp in assigned & self._kept & self._rewind.keys():
                self.consumer.seek(tp, self._rewind.pop(tp))
                rewound.add(tp)
            self._owned |= assigned
            self._kept = set()
            log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
            self._write_ready()
        return rewound

    def _give_up(self, rec: Any) -> None:
        """``rec`` will not be committed by this batch: read it again if the partition stays ours."""
        tp = _tp(rec)
        self._rewind[tp] = min(self._rewind.get(tp, rec.offset), rec.offset)

    # -- one batch: decide, deliver, commit ------------------------------------------------
    def _handle(self, batch: list[Any]) -> None:
        self.stats.batches += 1
        self._batch_tps, self._batch_revoked = {_tp(r) for r in batch}, False
        try:
            outputs = self._decide(batch)   # step 1: every frame has an outcome
            with self.processor.clock("deliver"):
                self._deliver(outputs)      # step 2: every outcome is in Kafka
            with self.processor.clock("commit"):
                self._commit(batch)         # step 3: only now are the input offsets released
            self.processor.committed()      # step 4: zero-shot banks learn only committed frames
        except BatchAbandoned as exc:
            self.processor.abandoned()
            self.stats.abandoned_batches += 1
            for rec in batch:
                self._give_up(rec)
            for tp in self._batch_tps:  # outputs may be out already: a re-read is marked
                self._window[tp] = None
                if tp in self._owned:  # still ours: read the batch again from its first record
                    self.consumer.seek(tp, self._rewind.pop(tp))
                    self._pending = [r for r in self._pending if _tp(r) != tp]
            log.warning("batch of %d frame(s) abandoned uncommitted (%s); whoever owns its "
                        "partitions next reads it again", len(batch), exc)
        finally:
            self._batch_tps = set()

    def _decide(self, batch: list[Any]) -> list[Outbound]:
        backoff = 1.0
        while True:
            try:
                return self.processor.process(batch, self._maybe_duplicate)
            except ModelUnavailable as exc:
                if self._say["model"].due():
                    log.error("the model fails even on a reference image (%s): %d frame(s) stay "
                              "uncommitted in Kafka and are retried every %.0fs (max 30s)",
                              exc, len(batch), backoff)
                self._pause(backoff)
                backoff = min(30.0, backoff * 2)

    def _deliver(self, outputs: list[Outbound]) -> None:
        t = self.cfg.topics
        self.delivery.deliver_all(outputs, (t.scores, t.alerts, t.review, t.deadletter), self._pause)

    def _commit(self, batch: list[Any]) -> None:
        nxt: dict[Any, int] = {}
        for rec in batch:
            nxt[_tp(rec)] = max(nxt.get(_tp(rec), 0), rec.offset + 1)
        self._commit_offsets(nxt)

    def _commit_offsets(self, nxt: dict[Any, int]) -> None:
        """Commit ``nxt`` (partition -> next offset) and any delivered, uncommitted offsets of
        partitions we own; retried while the broker is away, given up if the group moved on."""
        from kafka.errors import (
            CommitFailedError,
            IllegalGenerationError,
            KafkaError,
            RebalanceInProgressError,
            UnknownMemberIdError,
        )
        from kafka.structs import OffsetAndMetadata

        nxt = dict(nxt)
        for tp, done in list(self._delivered.items()):  # skipped re-deliveries ride along
            if tp in self._owned:
                nxt[tp] = max(nxt.get(tp, 0), done)
        nxt = {tp: o for tp, o in nxt.items() if tp in self._owned}
        if not nxt:
            raise BatchAbandoned("its partitions were revoked before the commit")
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in nxt.items()}
        attempt = 0
        while True:
            try:
                self.consumer.commit(offsets)
                break
            except (CommitFailedError, IllegalGenerationError, UnknownMemberIdError,
                    RebalanceInProgressError) as exc:
                # the group moved on: remember what was delivered, so we skip it if it comes back,
                # and decide nothing more before the next poll has applied the rebalance (the
                # next owner's duplicate window covers one batch, not what we would add to it)
                for tp, o in nxt.items():
                    self._delivered[tp] = max(self._delivered.get(tp, 0), o)
                for rec in self._pending:
                    self._give_up(rec)
                self._pending = []
                self._commit_failed(exc, "the group is rebalancing")
                return
            except KafkaError as exc:  # broker or coordinator unavailable: retry
                attempt += 1
                self._commit_failed(exc, f"retrying in {min(10, attempt)}s")
                try:
                    self._pause(min(10.0, float(attempt)))
                except BatchAbandoned:
                    for tp, o in nxt.items():
                        self._delivered[tp] = max(self._delivered.get(tp, 0), o)
                    raise
        self.stats.commits += 1
        metrics.COMMITS.labels(worker=self.cfg.worker_id).inc()
        for tp, o in nxt.items():
            if self._delivered.get(tp, -1) <= o:
                self._delivered.pop(tp, None)
            metrics.COMMITTED_OFFSET.labels(topic=tp.topic, partition=str(tp.partition)).set(o)

    def _commit_failed(self, exc: BaseException, then: str) -> None:
        self.stats.commit_failures += 1
        metrics.COMMIT_FAILURES.labels(worker=self.cfg.worker_id).inc()
        if self._say["commit"].due():
            log.warning("offset commit refused (%s: %s); %s", type(exc).__name__, exc, then)

    def _pause(self, seconds: float) -> None:
        """Wait while staying in the group: polls with every partition paused, applying
        rebalances. Raises BatchAbandoned when the batch's partitions are revoked, or when
        the worker has been stopping for longer than ``stop_grace_s``."""
        deadline = time.monotonic() + seconds
        paused: set[Any] = set()
        try:
            while True:
                # every partition, including ones assigned (or re-assigned fresh) meanwhile
                fresh = set(self.consumer.assignment()) - set(self.consumer.paused())
                if fresh:
                    self.consumer.pause(*fresh)
                    paused |= fresh
                if self._batch_revoked:
                    raise BatchAbandoned("its partitions were revoked while it waited")
                if self._stop.is_set():
                    self._stopping_since = self._stopping_since or time.monotonic()
                    if time.monotonic() - self._stopping_since > self.cfg.stop_grace_s:
                        raise BatchAbandoned("the worker is stopping")
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    return
                self._poll(min(left_ms, 200), 1, timed=False)
        finally:
            still = paused & set(self.consumer.assignment())
            if still:
                self.consumer.resume(*still)

    def _maybe_duplicate(self, rec: Any) -> bool:
        tp = _tp(rec)
        if tp not in self._window:
            return False
        end = self._window[tp]
        if end is None:  # first record read since the partition became ours
            end = self._window[tp] = rec.offset + self.cfg.max_batch
        if rec.offset >= end:
            del self._window[tp]
            return False
        return True

    # -- the rest ------------------------------------------------------------------------
    def _forget_cameras(self, keys: list[tuple[str, str]]) -> None:
        if self.drift is not None:
            self.drift.forget(keys)
        self.processor.forget_streams(keys)

    def _write_ready(self) -> None:
        if self.cfg.ready_file and not self._ready_written:
            Path(self.cfg.ready_file).write_text(f"{os.getpid()}\n")
            self._ready_written = True

    def _close(self) -> None:
        self.beliefs.close()
        try:
            self.producer.flush(timeout=30)
            self.producer.close(timeout=10)
        except Exception as exc:  # the batch in hand is already settled or abandoned
            log.warning("closing the producer: %s", exc)
        finally:
            self.consumer.close(autocommit=False)  # leave the group now: fast handover
            self.cameras.clear()  # the next owner of these cameras reports them


def _tp(rec: Any) -> Any:
    from kafka.structs import TopicPartition

    return TopicPartition(rec.topic, rec.partition)
