"""Every Prometheus metric linewatch exports, defined in one place.

Naming follows Prometheus conventions: one ``linewatch_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Labels are bounded: line,
camera, worker, Kafka topic and partition, and small enums (decision, reason, statistic).
A frame id is never a label.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server

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
    "linewatch_dead_letters_total", "Frames sent to the dead-letter topic, by reason.",
    ["worker", "reason"])
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
WORKER_INFO = Info("linewatch_worker",
                   "Scorer, backbone, software version and calibration profile of a worker.")

# --- review loop -------------------------------------------------------------
REVIEW_QUEUE = Gauge("linewatch_review_queue_items", "Review items by state.", ["state"])
REVIEW_RECEIVED = Counter("linewatch_review_items_stored_total",
                          "Review items the review service stored (re-deliveries not counted).")
REVIEW_VERDICTS = Counter("linewatch_review_verdicts_total", "Operator verdicts, by verdict.",
                          ["verdict"])
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


def publish_drift(monitor: DriftMonitor, forget_after_s: float = 300.0) -> None:
    """Export every camera's drift statistics, thresholds and image statistics.

    Cameras silent for ``forget_after_s`` (their partition moved to another worker,
    or the camera stopped) are dropped, with their series, so a stale value never
    keeps an alert firing.
    """
    from monitoring.drift import QUALITY_FEATURES

    for line, camera in monitor.forget_idle(forget_after_s):
        for name in STATISTICS:
            for g in (DRIFT, DRIFT_THRESHOLD):
                remove_series(g, line, camera, name)
        for name in QUALITY_FEATURES:
            remove_series(IMAGE_QUALITY, line, camera, name)
        remove_series(DRIFT_WINDOW_FRAMES, line, camera)
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


def remove_series(gauge: Gauge, *labels: str) -> None:
    """Stop exporting one labelled series (absent is fine)."""
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Expose /metrics over HTTP (port 0 picks a free one); returns the bound port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
