"""The camera-side loop: encode each frame, stamp its headers, send it to Kafka.

One producer serves one camera. It enforces the project's frame size limit
itself (a real cluster would reject a too-large record with an error the line
engineer would only see in logs; the embedded test broker would accept it),
paces frames to a maximum rate, and stops cleanly: on a stop request it
finishes the frame in hand and flushes what Kafka has not acknowledged yet.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from linewatch.wire import DEFAULT_MAX_FRAME_BYTES, FrameMeta, Topics
from monitoring import metrics
from producers.sources import SourceFrame

log = logging.getLogger(__name__)


def encode_frame(image: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> bytes:
    """RGB uint8 -> JPEG/PNG bytes."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use jpeg or png")
    if not ok:
        raise RuntimeError("OpenCV failed to encode the frame")
    return buf.tobytes()


@dataclass
class ProducerConfig:
    bootstrap: str
    topics: Topics = field(default_factory=Topics)
    camera: str = "cam-1"
    line: str = "line-1"
    fps: float = 10.0  # maximum rate; 0 = as fast as possible
    encoding: str = "jpeg"
    jpeg_quality: int = 90
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_frames: int | None = None
    start_seq: int | None = None  # default: milliseconds since the epoch (monotonic across restarts)
    acks: int | str = "all"


@dataclass
class ProducerStats:
    sent: int = 0
    acked: int = 0
    retried: int = 0  # sends the broker refused and that were sent again
    rejected: int = 0
    errors: int = 0
    bytes: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


def make_kafka_producer(bootstrap: str, max_request_bytes: int, acks: int | str = "all"):
    from kafka import KafkaProducer

    # acks=0 silently loses large records on some brokers; never use it for frames. Sends are
    # retried for up to two minutes, so a broker restart delays frames instead of losing them.
    # Not idempotent: kafka-python's idempotent producer wedged for good after one expired
    # batch against the embedded broker; a frame sent twice is one (camera, seq) to readers.
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=acks,
        enable_idempotence=False,
        linger_ms=5,
        request_timeout_ms=10_000,
        delivery_timeout_ms=120_000,
        max_request_size=max_request_bytes + 64 * 1024,
        client_id="linewatch-producer",
    )


def run_producer(cfg: ProducerConfig, frames: Iterator[SourceFrame],
                 stop: threading.Event | None = None,
                 on_acked: Callable[[FrameMeta], None] | None = None) -> ProducerStats:
    """Send frames until the source ends, ``max_frames`` is reached or ``stop`` is set.

    ``on_acked(meta)`` is called once Kafka acknowledged a frame (on the client's network
    thread: it must not block); every frame it was called for is durably in Kafka."""
    if cfg.acks in (0, "0"):
        raise ValueError("acks=0 can lose frames without any error; use 1 or 'all'")
    stop = stop or threading.Event()
    stats = ProducerStats()
    labels = {"line": cfg.line, "camera": cfg.camera}
    producer = make_kafka_producer(cfg.bootstrap, cfg.max_frame_bytes, cfg.acks)
    metrics.PRODUCER_SEND_ERRORS.labels(**labels)  # start at 0: "no errors", not "no data"
    metrics.FRAMES_REJECTED_AT_SOURCE.labels(**labels, reason="too_large")
    seq = cfg.start_seq if cfg.start_seq is not None else time.time_ns() // 1_000_000
    period = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
    next_at = time.monotonic()

    # acks arrive on the I/O thread, or here when a send completed at once
    end_offsets: dict[tuple[str, int], int] = {}
    end_lock = threading.Lock()

    def acked(meta: FrameMeta, md: Any) -> None:
        if on_acked is not None:
            on_acked(meta)
        key = (md.topic, md.partition)
        with end_lock:
            stats.acked += 1
            if md.offset + 1 > end_offsets.get(key, -1):
                end_offsets[key] = md.offset + 1
                metrics.PARTITION_END_OFFSET.labels(topic=md.topic, partition=str(md.partition)).set(
                    md.offset + 1)

    # a send the broker refused (not the frame's fault: e.g. the embedded broker's durable
    # storage losing a write race) is sent again from this thread, up to MAX_SEND_ATTEMPTS
    # with a jittered, growing pause, so two cameras that collided do not collide again
    retry: deque[tuple[float, FrameMeta, bytes, int]] = deque()
    jitter = random.Random(cfg.camera)

    def failed(meta: FrameMeta, payload: bytes, attempt: int, exc: BaseException) -> None:
        if attempt < MAX_SEND_ATTEMPTS and not _too_large(exc):
            stats.retried += 1
            pause = min(2.0, 0.05 * 2 ** attempt) * jitter.uniform(0.5, 1.5)
            retry.append((time.monotonic() + pause, meta, payload, attempt + 1))
            return
        stats.errors += 1
        metrics.PRODUCER_SEND_ERRORS.labels(**labels).inc()
        log.error("Kafka did not accept frame %s after %d attempt(s): %s", meta.frame_id, attempt, exc)

    def send(meta: FrameMeta, payload: bytes, attempt: int = 1) -> None:
        from kafka.errors import KafkaError

        try:
            fut = producer.send(cfg.topics.frames, key=meta.key, value=payload, headers=meta.headers())
        except KafkaError as exc:  # e.g. no metadata while the broker restarts
            failed(meta, payload, attempt, exc)
            return
        fut.add_callback(acked, meta).add_errback(failed, meta, payload, attempt)

    def resend(wait: bool = False) -> None:
        """Send the retries that are due (all of them, after waiting, with ``wait``)."""
        for _ in range(len(retry)):
            due, meta, payload, attempt = retry.popleft()
            if due > time.monotonic() and not wait:
                retry.append((due, meta, payload, attempt))
                continue
            time.sleep(max(0.0, due - time.monotonic()))
            send(meta, payload, attempt)

    try:
        for frame in frames:
            # --frames counts frames taken from the camera, sent or refused: a camera whose
            # every frame is over the limit must still stop after N
            if stop.is_set() or (cfg.max_frames is not None
                                 and stats.sent + stats.rejected >= cfg.max_frames):
                break
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                next_at = max(next_at + period, time.monotonic() - period)
            capture_ns = time.time_ns()
            payload = encode_frame(frame.image, cfg.encoding, cfg.jpeg_quality)
            if len(payload) > cfg.max_frame_bytes:
                stats.rejected += 1
                metrics.FRAMES_REJECTED_AT_SOURCE.labels(**labels, reason="too_large").inc()
                log.error(
                    "frame %s of camera %s is %d bytes, over the limit of %d: not sent. "
                    "Lower --jpeg-quality, downscale the camera, or raise --max-frame-bytes "
                    "(and the cluster's message.max.bytes).",
                    frame.name, cfg.camera, len(payload), cfg.max_frame_bytes)
                continue
            h, w = frame.image.shape[:2]
            meta = FrameMeta(camera=cfg.camera, line=cfg.line, seq=seq, capture_ns=capture_ns,
                             encoding=cfg.encoding, width=w, height=h, truth=frame.truth)
            resend()
            send(meta, payload)
            stats.first_seq = seq if stats.first_seq is None else stats.first_seq
            stats.last_seq = seq
            stats.sent += 1
            stats.bytes += len(payload)
            metrics.FRAMES_PRODUCED.labels(**labels).inc()
            metrics.FRAME_BYTES_PRODUCED.labels(**labels).inc(len(payload))
            seq += 1
    finally:
        producer.flush(timeout=130)
        while retry:  # bounded: every frame has at most MAX_SEND_ATTEMPTS
            resend(wait=True)
            producer.flush(timeout=130)
        producer.close(timeout=10)
    return stats


MAX_SEND_ATTEMPTS = 8


def _too_large(exc: BaseException) -> bool:
    from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)
