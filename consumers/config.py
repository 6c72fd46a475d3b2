"""A worker's settings and the small pieces its Kafka loop is made of.

Kept apart from :mod:`consumers.worker` so the loop reads as the loop: what the
group and the clients are configured with, and the counters it keeps, are here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from linewatch.wire import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_PIXELS, Topics

if TYPE_CHECKING:  # kept light: the command line reads the defaults below for its --help
    from consumers.process import BatchStats, RetryPolicy
    from inference.calibration import Thresholds


def _retry_policy() -> RetryPolicy:
    from consumers.process import RetryPolicy

    return RetryPolicy()


def _batch_stats() -> BatchStats:
    from consumers.process import BatchStats

    return BatchStats()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerConfig:
    bootstrap: str
    thresholds: Thresholds | None = None  # None until build_worker sets them
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
    # also the rebalance timeout: how long the group waits for a member that does not
    # rejoin (the default 300 s stalled the whole group when a member died mid-rebalance)
    max_poll_interval_ms: int = 60_000
    delivery_timeout_ms: int = 30_000
    # how long the broker may hold a fetch that has no data yet; 50 ms keeps decisions fast,
    # the embedded broker's durable storage needs ~500 (its fetches take longer than 50 ms)
    fetch_max_wait_ms: int = 50
    max_cameras: int = 256
    camera_idle_s: float = 300.0
    retry: RetryPolicy = field(default_factory=_retry_policy)
    stop_grace_s: float = 10.0  # how long a stopping worker keeps retrying the batch in hand
    exit_when_idle_s: float | None = None
    ready_file: str | None = None


@dataclass
class WorkerStats:
    frames: BatchStats = field(default_factory=_batch_stats)  # what happened to the frames
    batches: int = 0
    abandoned_batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    skipped_redeliveries: int = 0


class Rebalances:
    """What the rebalance listener saw, handed from the network thread to the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: set[Any] = set()
        self._lost: set[Any] = set()
        self._assigned: set[Any] = set()

    def record(self, revoked: Any = (), lost: Any = (), assigned: Any = ()) -> None:
        with self._lock:
            self._revoked |= set(revoked)
            self._lost |= set(lost)
            self._assigned |= set(assigned)

    def take(self) -> tuple[set[Any], set[Any], set[Any]]:
        with self._lock:
            out = (self._revoked, self._lost, self._assigned)
            self._revoked, self._lost, self._assigned = set(), set(), set()
        return out


class EveryMinute:
    """Log a repeating condition once a minute, not once per retry."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s, self._last = every_s, float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            return True
        return False


def kafka_clients(cfg: WorkerConfig) -> tuple[Any, Any]:
    """The worker's consumer (group member, manual commits) and producer (acks from all
    replicas, not idempotent: see below), sized for ``cfg``'s frames."""
    from kafka import KafkaConsumer, KafkaProducer

    w = cfg.worker_id
    consumer = KafkaConsumer(
        bootstrap_servers=cfg.bootstrap,
        group_id=cfg.group_id,
        client_id=f"linewatch-worker-{w}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=cfg.max_batch,
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        fetch_max_bytes=max(52_428_800, cfg.max_frame_bytes * 2),
        max_partition_fetch_bytes=max(1_048_576, cfg.max_frame_bytes + 65_536),
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
    )
    request_ms = min(10_000, cfg.delivery_timeout_ms - 10)
    producer = KafkaProducer(
        bootstrap_servers=cfg.bootstrap,
        client_id=f"linewatch-worker-out-{w}",
        acks="all",
        # kafka-python's idempotent producer (its default) wedged for good after one batch
        # expired against the embedded broker (measured: every later send timed out). A
        # frame's outputs are keyed by (camera, seq) and readers deduplicate on that, so a
        # record written twice by a producer retry costs nothing.
        enable_idempotence=False,
        linger_ms=2,
        request_timeout_ms=request_ms,
        delivery_timeout_ms=cfg.delivery_timeout_ms,
        max_block_ms=min(10_000, cfg.delivery_timeout_ms),  # a missing topic's metadata
        max_request_size=cfg.max_frame_bytes + 256 * 1024,
    )
    return consumer, producer


def rebalance_listener(events: Rebalances) -> Any:
    """A listener that only records: kafka-python runs it on its network thread, where
    nothing may block (no scoring, no commit), so the loop applies the events itself."""
    from kafka import ConsumerRebalanceListener

    class _Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            events.record(revoked=revoked)

        def on_partitions_lost(self, lost: Any) -> None:
            events.record(lost=lost)

        def on_partitions_assigned(self, assigned: Any) -> None:
            events.record(assigned=assigned)

    return _Listener()
