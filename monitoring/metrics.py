"""Every Prometheus metric linewatch exports, defined in one place.

Naming follows Prometheus conventions: one ``linewatch_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Labels are bounded: line,
camera, worker, Kafka topic and partition, and small enums (decision, reason, statistic).
A frame id is never a label.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server

from inference.settings import MUTUAL_MODES
from monitoring.drift import STATISTICS

if TYPE_CHECKING:
    from monitoring.drift import DriftMonitor, DriftReference

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

# --- producer ---------------------------------------------------------------
FRAMES_PRODUCED = Counter(
    "linewatch_producer_frames_total", "Frames a producer handed to Kafka.", ["line", "camera"])
FRAME_BYTES_PRODUCED = Counter(
    "linewatch_producer_frame_bytes_total", "Encoded frame bytes a producer sent.", ["line", "camera"])
FRAMES_REJECTED_AT_SOURCE = Counter(
    "linewatch_producer_frames_rejected_total",
    "Frames a producer refused to send (e.g. over the frame size limit).",
    ["line", "camera", "reason"])
PRODUCER_SEND_ERRORS = Counter(
    "linewatch_producer_send_errors_total", "Frames Kafka did not acknowledge.", ["line", "camera"])

# --- worker -----------------------------------------------------------------
FRAMES_RECEIVED = Counter(
    "linewatch_frames_received_total", "Frame records a worker consumed.", ["worker"])
FRAMES_SCORED = Counter(
    "linewatch_frames_scored_total", "Frames scored, by routing decision.",
    ["line", "camera", "decision"])
DEAD_LETTERS = Counter(
    "linewatch_dead_letters_total",
    "Frames sent to the dead-letter topic, by reason; cause is bad_input (the camera's fault) "
    "or failed (valid input the worker could not process).", ["worker", "reason", "cause"])
MODEL_ERRORS = Counter(
    "linewatch_model_errors_total", "Model calls that raised (every retry counts).", ["worker"])
MODEL_UP = Gauge(
    "linewatch_model_up",
    "1 while the model scores; 0 while it fails even on a known-good reference image (the "
    "batch stays uncommitted in Kafka and is retried).", ["worker"])
FRAME_ERRORS = Counter(
    "linewatch_frame_errors_total",
    "Per-frame failures outside the model that were contained: the frame was still routed "
    "(routing: without explanation; explain: without defect words; drift: not observed).",
    ["worker", "stage"])
OUTPUTS_SHRUNK = Counter(
    "linewatch_outputs_shrunk_total",
    "Outputs the cluster refused as too large and that were sent in their smaller form.",
    ["worker", "topic"])
OUTPUTS_DROPPED = Counter(
    "linewatch_outputs_dropped_total",
    "Outputs refused permanently even in their smaller form (the frame's score was still "
    "delivered unless the topic is .scores).", ["worker", "topic"])
OUTPUT_BLOCKED = Gauge(
    "linewatch_output_blocked",
    "1 while a topic refuses this worker's outputs (unknown topic, not authorised): the "
    "batch stays uncommitted and is retried.", ["worker", "topic"])
MAYBE_DUPLICATES = Counter(
    "linewatch_frames_maybe_duplicate_total",
    "Frames scored right after their partition changed owner, within one batch of the "
    "committed offset: a previous owner may have scored them (marked on the score).", ["worker"])
RECORDS_REJECTED = Counter(
    "linewatch_records_rejected_total",
    "Records a reader refused (malformed, unknown schema, unsigned, forged, bad image); each "
    "is logged once with its topic/partition/offset and skipped.", ["reader", "topic", "reason"])
CAMERAS_TRACKED = Gauge(
    "linewatch_cameras_tracked", "Cameras with their own series (and drift window) here.",
    ["worker"])
CAMERA_LIMIT = Gauge(
    "linewatch_camera_limit",
    "Most cameras with their own series here; frames of further cameras are still scored and "
    'counted under camera="_other".', ["worker"])
CAMERA_OVERFLOW_FRAMES = Counter(
    "linewatch_camera_overflow_frames_total",
    'Frames of cameras over the limit (counted under camera="_other").', ["worker"])
ALERTS = Counter("linewatch_alerts_total", "Alerts emitted.", ["line", "camera"])
REVIEW_ITEMS = Counter("linewatch_review_items_total", "Frames sent for human review.",
                       ["line", "camera"])
SCORING_SECONDS = Histogram(
    "linewatch_scoring_seconds", "Model time for one micro-batch.", ["worker"],
    buckets=_LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram(
    "linewatch_end_to_end_latency_seconds", "Capture time to routing decision, per frame.",
    ["line", "camera"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram(
    "linewatch_batch_size_frames", "Frames per scored micro-batch.", ["worker"],
    buckets=(1, 2, 4, 8, 16, 32, 64))
ANOMALY_SCORE = Histogram(
    "linewatch_anomaly_score", "Anomaly scores of scored frames.", ["line", "camera"],
    buckets=_SCORE_BUCKETS)
WORKER_STEPS = ("poll", "decode", "score", "route", "drift", "deliver", "commit", "learn")
STEP_SECONDS = Counter(
    "linewatch_worker_step_seconds_total",
    "Wall time the worker's loop spent in each step: where a frame's time goes. 'score' is the "
    "model; 'poll' includes waiting for frames; 'learn' is operator verdicts and recalibration; "
    "a step's retries and backoff waits count as that step's time.",
    ["worker", "step"])
COMMITS = Counter("linewatch_offset_commits_total", "Offset commits after a flushed batch.",
                  ["worker"])
COMMIT_FAILURES = Counter(
    "linewatch_offset_commit_failures_total",
    "Offset commits refused (e.g. by a rebalance); the batch will be re-read.", ["worker"])
DELIVERY_RETRIES = Counter(
    "linewatch_output_delivery_retries_total",
    "Batches re-processed because an output could not be delivered.", ["worker"])
THRESHOLD = Gauge("linewatch_threshold", "Decision thresholds in use.", ["worker", "kind"])
REFERENCE_IMAGES = Gauge("linewatch_reference_images", "Normal images in the reference memory.",
                         ["worker"])
THRESHOLDS_CALIBRATED = Gauge(
    "linewatch_thresholds_calibrated",
    "1 when the thresholds in use come from normal frames (conformal) or were set by hand; 0 when "
    "they are uncalibrated, derived from each camera's own scores and the expected anomaly rate "
    "(zero-shot mutual scoring before operators confirmed enough normals).", ["worker"])
SCORING_MODE = Gauge(
    "linewatch_camera_scoring_mode",
    "1 for how the camera's last frame was scored: warm-up (its bank or its threshold window is "
    "still filling: frames go to review), mutual (zero-shot, against its recent frames) or "
    "few-shot (against operator-confirmed normals); 0 for the others.",
    ["line", "camera", "mode"])
WORKER_INFO = Info("linewatch_worker",
                   "Scorer, backbone, software version and calibration profile of a worker.")

# --- review loop -------------------------------------------------------------
REVIEW_QUEUE = Gauge("linewatch_review_queue_items", "Review items by state.", ["state"])
REVIEW_RECEIVED = Counter("linewatch_review_items_stored_total",
                          "Review items the review service stored (re-deliveries not counted).")
REVIEW_VERDICTS = Counter("linewatch_review_verdicts_total", "Operator verdicts, by verdict.",
                          ["verdict"])
REVIEW_PRUNED = Counter("linewatch_review_items_pruned_total",
                        "Review items deleted by retention (--retention-days), by state.", ["state"])
REVIEW_LOGINS = Counter("linewatch_review_logins_total",
                        "Sign-in attempts on the review service, by outcome.", ["outcome"])
LABELS_APPLIED = Counter(
    "linewatch_labels_applied_total",
    "Operator labels a worker acted on (normal: frame added to the reference memory).",
    ["worker", "verdict"])
LEARNED_NORMALS = Gauge("linewatch_learned_normals",
                        "Frames operators judged normal that are in this worker's reference memory.",
                        ["worker"])
PROFILE_RELOADS = Counter("linewatch_profile_reloads_total",
                          "Line profiles swapped in while running (the file changed).", ["worker"])
RECALIBRATIONS = Counter("linewatch_recalibrations_total",
                         "Threshold recalibrations after the reference memory changed.", ["worker"])

# --- consumer lag, from both ends -------------------------------------------
# Lag = end offset - committed offset, per partition. The end offset is taken from
# the producers' acknowledged sends, not from the broker's reported high watermark
# (which the embedded test broker gets wrong); the recording rule
# linewatch:consumer_lag_frames:sum joins the two.
PARTITION_END_OFFSET = Gauge(
    "linewatch_kafka_partition_end_offset",
    "Offset after the last frame this producer had acknowledged on a partition.",
    ["topic", "partition"])
COMMITTED_OFFSET = Gauge(
    "linewatch_kafka_committed_offset",
    "Next offset this worker committed on a partition it owns.", ["topic", "partition"])

# --- drift (monitoring/drift.py) --------------------------------------------
DRIFT = Gauge(
    "linewatch_drift",
    "Drift statistic of a camera's recent window against its calibration reference.",
    ["line", "camera", "statistic"])
DRIFT_THRESHOLD = Gauge(
    "linewatch_drift_threshold", "Threshold above which a drift statistic is drift.",
    ["line", "camera", "statistic"])
DRIFT_WINDOW_FRAMES = Gauge(
    "linewatch_drift_window_frames", "Frames in a camera's drift window.", ["line", "camera"])
IMAGE_QUALITY = Gauge(
    "linewatch_image_quality",
    "Window mean of an image statistic (brightness/contrast in 0-255 luma, sharpness as "
    "Laplacian variance over luma variance, chroma in CIELab units).", ["line", "camera", "statistic"])
IMAGE_QUALITY_REFERENCE = Gauge(
    "linewatch_image_quality_reference", "The same image statistic on the calibration frames.",
    ["statistic"])


class StepClock:
    """Times the worker's steps into :data:`STEP_SECONDS` (``with clock("decode"): ...``)."""

    def __init__(self, worker: str) -> None:
        self._children = {step: STEP_SECONDS.labels(worker=worker, step=step) for step in WORKER_STEPS}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._children[step].inc(time.perf_counter() - t0)


def read_counters(metrics_url: str, timeout_s: float = 10) -> dict[str, dict[str, float]]:
    """Counters of one /metrics scrape, summed per family and first label value: ``{family:
    {label value: total}}`` (one ``""`` key for unlabelled series). The demo and the pipeline
    benchmark read a worker's :data:`STEP_SECONDS` (by step) and frames received this way."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if fam.type == "counter" and sample.name.endswith("_total"):
                key = sample.labels.get("step", "")
                into = out.setdefault(fam.name, {})
                into[key] = into.get(key, 0.0) + sample.value
    return out


def read_step_seconds(metrics_url: str, timeout_s: float = 10) -> dict[str, float]:
    """A worker's :data:`STEP_SECONDS` by step, read from its /metrics URL."""
    return read_counters(metrics_url, timeout_s).get("linewatch_worker_step_seconds", {})


def publish_drift(monitor: DriftMonitor) -> None:
    """Export every camera's drift statistics, thresholds and image statistics (cameras
    that went quiet are dropped by :class:`CameraSeries`, series and window alike)."""
    from monitoring.drift import QUALITY_FEATURES

    for (line, camera), cam in monitor.snapshot().items():
        for name, value in cam.statistics.items():
            DRIFT.labels(line=line, camera=camera, statistic=name).set(value)
            DRIFT_THRESHOLD.labels(line=line, camera=camera, statistic=name).set(cam.thresholds[name])
        for name, value in zip(QUALITY_FEATURES, cam.quality, strict=True):
            IMAGE_QUALITY.labels(line=line, camera=camera, statistic=name).set(float(value))
        DRIFT_WINDOW_FRAMES.labels(line=line, camera=camera).set(cam.frames)


def publish_reference(reference: DriftReference) -> None:
    from monitoring.drift import QUALITY_FEATURES

    for name, value in zip(QUALITY_FEATURES, reference.quality.mean(axis=0), strict=True):
        IMAGE_QUALITY_REFERENCE.labels(statistic=name).set(float(value))


def remove_series(gauge: Gauge | Counter | Histogram, *labels: str) -> None:
    """Stop exporting one labelled series (absent is fine)."""
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


OVERFLOW = "_other"  # line and camera label of frames from cameras over the limit
DECISIONS = ("normal", "review", "alert")


def _remove_camera_series(line: str, camera: str) -> None:
    from monitoring.drift import QUALITY_FEATURES

    for d in DECISIONS:
        remove_series(FRAMES_SCORED, line, camera, d)
    for m in (ALERTS, REVIEW_ITEMS, END_TO_END_SECONDS, ANOMALY_SCORE, DRIFT_WINDOW_FRAMES):
        remove_series(m, line, camera)
    for mode in MUTUAL_MODES:
        remove_series(SCORING_MODE, line, camera, mode)
    for name in STATISTICS:
        remove_series(DRIFT, line, camera, name)
        remove_series(DRIFT_THRESHOLD, line, camera, name)
    for name in QUALITY_FEATURES:
        remove_series(IMAGE_QUALITY, line, camera, name)


class CameraSeries:
    """Which cameras get their own series here: bounded in number and in idle time.

    Camera and line ids come from outside (frame headers), so state keyed by them must be
    bounded. A camera is tracked from its first frame until it has been silent for
    ``idle_s`` (its partition moved to another worker, or the camera stopped: its series
    and drift window go, so a stale value never keeps an alert firing). At most
    ``max_cameras`` are tracked; frames of further cameras are still scored and routed,
    and counted under ``camera="_other"``, never given series of their own.
    """

    def __init__(self, worker: str, max_cameras: int = 256, idle_s: float = 300.0,
                 on_forget: Callable[[list[tuple[str, str]]], None] | None = None) -> None:
        if max_cameras < 1 or idle_s <= 0:
            raise ValueError("max_cameras must be >= 1 and idle_s > 0")
        self.worker, self.max_cameras, self.idle_s = worker, max_cameras, idle_s
        self.on_forget = on_forget
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        CAMERAS_TRACKED.labels(worker=worker).set(0)
        CAMERA_LIMIT.labels(worker=worker).set(max_cameras)
        CAMERA_OVERFLOW_FRAMES.labels(worker=worker)

    def __len__(self) -> int:
        return len(self._last)

    def admit(self, line: str, camera: str) -> tuple[str, str] | None:
        """The (line, camera) labels to count this frame under; None means the overflow."""
        key, now = (line, camera), time.monotonic()
        with self._lock:
            if key in self._last:
                self._last[key] = now
                self._last.move_to_end(key)
                return key
        self.expire(now)
        with self._lock:
            if len(self._last) >= self.max_cameras:
                CAMERA_OVERFLOW_FRAMES.labels(worker=self.worker).inc()
                return None
            self._last[key] = now
            CAMERAS_TRACKED.labels(worker=self.worker).set(len(self._last))
        for d in DECISIONS:  # a new camera's counters start at 0: "none", not "no data"
            FRAMES_SCORED.labels(line=line, camera=camera, decision=d)
        ALERTS.labels(line=line, camera=camera)
        REVIEW_ITEMS.labels(line=line, camera=camera)
        return key

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Forget cameras silent for ``idle_s``: their series, and (``on_forget``) their state."""
        now = time.monotonic() if now is None else now
        return self._forget(lambda seen: now - seen > self.idle_s)

    def clear(self) -> list[tuple[str, str]]:
        """Forget every camera: a stopping worker withdraws its series, so a process that goes
        on (an in-process worker, the demo) never serves a stale drift value to Prometheus."""
        return self._forget(lambda seen: True)

    def _forget(self, stale: Callable[[float], bool]) -> list[tuple[str, str]]:
        gone: list[tuple[str, str]] = []
        with self._lock:
            while self._last:  # oldest first: stop at the first camera still fresh
                key, seen = next(iter(self._last.items()))
                if not stale(seen):
                    break
                del self._last[key]
                gone.append(key)
            CAMERAS_TRACKED.labels(worker=self.worker).set(len(self._last))
        for line, camera in gone:
            _remove_camera_series(line, camera)
        if gone and self.on_forget is not None:
            self.on_forget(gone)
        return gone



def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Expose /metrics over HTTP (port 0 picks a free one); returns the bound port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
