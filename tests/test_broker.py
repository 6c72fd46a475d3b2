"""The embedded broker on durable storage (``linewatch broker --data-dir``): kill -9 it
mid-stream, start it again on the same folder, and nothing acknowledged before the kill is
gone; a worker and a camera ride through it. Real processes: Tansu, the localbucket S3
server writing to disk, a `linewatch worker`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from conftest import REPO, Camera, collect, wait_for

from linewatch.broker import EmbeddedBroker, create_topics
from linewatch.wire import Topics


def _read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 60) -> list[bytes]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = wait_for(lambda: c.partitions_for_topic(topic), 30, f"metadata of {topic}")
        c.assign([TopicPartition(topic, p) for p in parts])
        c.seek_to_beginning()
        got: list[bytes] = []

        def more() -> bool:
            for records in c.poll(timeout_ms=500).values():
                got.extend(r.value for r in records)
            return len(got) >= expect

        wait_for(more, timeout_s, f"{expect} records on {topic}", interval_s=0)
        return got
    finally:
        c.close()


def test_acknowledged_records_survive_a_broker_kill_9(tmp_path):
    from kafka import KafkaProducer

    broker = EmbeddedBroker(data_dir=tmp_path / "data", log_path=tmp_path / "broker.log").start()
    try:
        create_topics(broker.bootstrap, Topics("dur"), partitions=3)
        acked: list[bytes] = []
        lock = threading.Lock()
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False,
                          linger_ms=5, request_timeout_ms=3000, delivery_timeout_ms=60_000)

        def ok(value: bytes):
            def done(_md: object) -> None:
                with lock:
                    acked.append(value)
            return done

        for i in range(400):
            if i == 200:
                p.flush()
                broker.kill()  # mid-stream: the next 200 are sent into a dead broker
                wait_for(lambda: broker.exit_code is not None, 10, "the broker to die")
            if i == 260:
                broker.restart()
            value = f"r{i}".encode()
            p.send("dur.frames", value=value).add_callback(ok(value))
        p.flush(timeout=60)
        p.close()
        assert len(acked) == 400  # the producer retried through the outage
        broker.kill()
        broker.restart()  # and once more: what was acknowledged is on disk
        stored = _read_all(broker.bootstrap, "dur.frames", len(acked))
        assert set(acked) <= set(stored), sorted(set(acked) - set(stored))[:5]
    finally:
        broker.stop()


def test_a_worker_scores_on_through_a_broker_restart(tmp_path, references):
    broker = EmbeddedBroker(data_dir=tmp_path / "data", log_path=tmp_path / "broker.log").start()
    t = Topics("ride")
    create_topics(broker.bootstrap, t, partitions=2)
    log = tmp_path / "worker.log"
    ready = tmp_path / "worker.ready"
    cmd = [sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", broker.bootstrap,
           "--topic-prefix", t.prefix, "--group-id", "g-ride", "--references", str(references),
           "--scorer", "noop", "--session-timeout-ms", "6000", "--metrics-port", "0",
           "--ready-file", str(ready)]
    with open(log, "ab") as fh:
        worker = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: ready.exists() or worker.poll() is not None, 60, "the worker")
        cam = Camera(broker, t, frames=120, fps=20, camera="cam-d")
        collect(broker, t, lambda x: len(x.scores) >= 30, 60)
        broker.kill()
        broker.restart()
        tally = collect(broker, t, lambda x: cam.done.is_set() and cam.sent <= x.accounted, 120).tally
        assert worker.poll() is None, log.read_text()
        assert not cam.sent - tally.accounted
        assert not tally.unmarked_duplicates, tally.unmarked_duplicates
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        broker.stop()
