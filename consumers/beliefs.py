"""What a running worker believes, and the two ways that changes without a restart.

A worker scores with a scorer, thresholds and a drift reference. They change when
the line profile file is replaced (:class:`~consumers.profiles.ProfileWatcher`
builds the new one in the background) and when operators' signed verdicts arrive
on ``.labels`` (:class:`~consumers.labels.ReferenceLearner`). Both are applied
here, between two batches, so every frame is scored by one consistent set of
beliefs; the Kafka loop (:mod:`consumers.worker`) only says when.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from consumers.config import WorkerConfig
from consumers.labels import LabelFollower, LearnResult, ReferenceLearner
from consumers.process import FrameProcessor
from consumers.profiles import LoadedProfile, ProfileWatcher
from inference.calibration import Thresholds
from monitoring import metrics

log = logging.getLogger("consumers.worker")

# verdicts are read at most this often between batches: polling the labels consumer after
# every batch cost a paced (one-frame) batch about 2 ms, for verdicts that wait 2 s to settle
LABEL_POLL_S = 0.5


class Beliefs:
    """The processor's scorer, thresholds and drift, kept current from profiles and verdicts."""

    def __init__(self, cfg: WorkerConfig, processor: FrameProcessor, learner: ReferenceLearner | None,
                 watcher: ProfileWatcher | None, label_key: bytes | None,
                 info: dict[str, str] | None) -> None:
        self.cfg, self.processor, self.learner, self.watcher = cfg, processor, learner, watcher
        self.label_key = label_key
        self.labels: LabelFollower | None = None
        self._labels_polled = float("-inf")
        self.info = dict(info or {})
        if self.info:
            metrics.WORKER_INFO.info(self.info)
        assert cfg.thresholds is not None
        self._publish(cfg.thresholds)

    def start(self, stop: threading.Event) -> None:
        """Apply every verdict already on ``.labels`` before scoring (the memory survives restarts)."""
        if self.learner is None:
            return
        assert self.label_key is not None
        self.labels = LabelFollower(self.cfg.bootstrap, self.cfg.topics.labels, self.label_key,
                                    self.cfg.max_frame_bytes, self.cfg.max_pixels)
        quiet = 0
        while quiet < 2 and not stop.is_set():
            got = self.labels.poll(500)
            quiet = 0 if got else quiet + 1
            self.learner.apply(got)
        self._use(self.learner.learn())  # once, for everything replayed

    def update(self) -> None:
        """Between batches: a freshly built profile, then verdicts (learned once they settle)."""
        if self.watcher is not None and (fresh := self.watcher.poll()) is not None:
            self._swap_profile(fresh)
        if self.labels is not None and self.learner is not None:
            now = time.monotonic()
            if now - self._labels_polled >= LABEL_POLL_S:
                self._labels_polled = now
                self.learner.apply(self.labels.poll(0))
            if self.learner.due():
                self._use(self.learner.learn())

    def close(self) -> None:
        if self.labels is not None:
            self.labels.close()

    def _swap_profile(self, new: LoadedProfile) -> None:
        if self.learner is not None:  # operator-confirmed normals stay learned across reloads
            self.learner.rebase(new.scorer, new.references)
        if getattr(new.scorer, "per_camera", False):  # its banks start empty: the frames warm them
            new.scorer.max_streams = self.cfg.max_cameras
        self.processor.scorer = new.scorer
        self.processor.describe = new.describe  # the profile's class name and vocabulary
        if new.references:
            self.processor.probe = new.references[0]
        if new.drift is not None:
            self.processor.drift = new.drift
        self._set_thresholds(new.thresholds)
        metrics.REFERENCE_IMAGES.labels(worker=self.cfg.worker_id).set(len(new.references))
        metrics.PROFILE_RELOADS.labels(worker=self.cfg.worker_id).inc()
        if self.info:
            self.info.update(new.info or {}, profile=new.fingerprint[:12])
            metrics.WORKER_INFO.info(self.info)
        log.info("profile %s in use: alert %.4f, review %.4f", new.fingerprint[:12],
                 new.thresholds.alert, new.thresholds.review)

    def _publish(self, th: Thresholds) -> None:
        if th.uncalibrated:  # zero-shot: each camera has its own; the worker has none to show
            for kind in ("alert", "review"):
                metrics.remove_series(metrics.THRESHOLD, self.cfg.worker_id, kind)
            return
        metrics.THRESHOLD.labels(worker=self.cfg.worker_id, kind="alert").set(th.alert)
        metrics.THRESHOLD.labels(worker=self.cfg.worker_id, kind="review").set(th.review)

    def _set_thresholds(self, th: Thresholds) -> None:
        self.cfg.thresholds = self.processor.thresholds = th
        if self.processor.stream_thresholds is not None and th.n_normals > 0:
            self.processor.stream_thresholds = None  # calibrated on normals: the cameras' own are done
            log.warning("zero-shot thresholds replaced by calibrated ones (%d confirmed normals)",
                        th.n_normals)
        metrics.THRESHOLDS_CALIBRATED.labels(worker=self.cfg.worker_id).set(
            self.processor.stream_thresholds is None)
        self._publish(th)
        scorer: Any = self.processor.scorer
        if hasattr(scorer, "map_gate"):  # a reloaded profile's scorer starts ungated: gate it too
            scorer.map_gate = th.review

    def _use(self, res: LearnResult) -> None:
        if res.thresholds is not None:
            th, old = res.thresholds, self.processor.thresholds
            log.info("recalibrated after %d learned normal(s): alert %.4f -> %.4f, review %.4f -> "
                     "%.4f", res.added, old.alert, th.alert, old.review, th.review)
            self._set_thresholds(th)
        # the memory changed, so normal frames score lower: drift compares live scores with the
        # calibration frames' scores under the same memory, or it would report the learning
        if self.processor.drift is not None and res.holdout_scores is not None:
            self.processor.drift.rebase_scores(res.holdout_scores)
