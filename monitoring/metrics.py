"""Every Prometheus metric linewatch exports, defined in one place.

Naming follows Prometheus conventions: one ``linewatch_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Labels are bounded: line,
camera, worker, and small enums (decision, reason). A frame id is never a label.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server

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
WORKER_INFO = Info("linewatch_worker", "Scorer, backbone and software version of a worker.")


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Expose /metrics over HTTP (port 0 picks a free one); returns the bound port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
