"""End-to-end: producer -> real broker -> real worker processes -> output topics.

What is covered: every frame accounted for exactly once in ``.scores`` or
``.deadletter`` (deduplicated by camera + sequence), failover after SIGKILL,
draining on SIGTERM, and dead-lettering of every kind of bad input while the
worker keeps going. What is not: a real Apache Kafka cluster (the broker here is
Tansu, Kafka-protocol compatible; the code uses only standard client APIs).
"""

from __future__ import annotations

import re
import signal
import urllib.request

import cv2
import numpy as np
import pytest
from conftest import Camera, collect, frame_meta, send_raw

from linewatch.wire import H_DL_REASON, Alert, Score, headers_dict


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", im)[1].tobytes()


def test_frames_flow_end_to_end_exactly_once(broker, topics, workers):
    w = workers("w1")
    w.wait_ready()
    cam = Camera(broker, topics, frames=40, fps=0, defect_rate=0.3)
    # every frame decided, and the alert / review records sent beside its score read too (they
    # travel on other topics: reading stopped at the last score once missed a review item)
    reader = collect(broker, topics, lambda t: cam.done.is_set() and cam.sent <= t.accounted
                     and not t.unrouted)
    t = reader.tally
    assert len(cam.sent) == 40
    assert set(t.scores) == cam.sent, "every frame scored once"
    assert not t.dead and t.duplicates == 0
    decisions = {s.decision for s in t.scores.values()}
    assert decisions <= {"normal", "review", "alert"}
    # the routing table: alerts exactly for scores >= alert threshold
    expected_alerts = {k for k, s in t.scores.items() if s.score >= s.alert_threshold}
    assert t.alerts == expected_alerts
    expected_review = {k for k, s in t.scores.items() if s.review_threshold <= s.score < s.alert_threshold}
    assert set(t.reviews) == expected_review
    # the real scorer separates the conveyor's defects from normal frames
    d = [s.score for s in t.scores.values() if s.truth == "defect"]
    n = [s.score for s in t.scores.values() if s.truth == "normal"]
    assert d and n and np.median(d) > np.percentile(n, 90)
    assert all(s.capture_ns <= s.decided_ns for s in t.scores.values())
    # the worker's Prometheus endpoint counts the same frames
    url = re.search(r"metrics on (http://\S+/metrics)", w.log.read_text()).group(1)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    scored = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("linewatch_frames_scored_total{"))
    assert scored == 40
    assert 'linewatch_end_to_end_latency_seconds_count{camera="cam-t",line="L"} 40.0' in text
    assert re.search(r'linewatch_threshold\{kind="alert",worker="w1"\} 0\.5', text)
    assert w.stop() == 0


def test_worker_killed_mid_stream_survivor_finishes(broker, topics, workers):
    procs = {"A": workers("A", "--max-batch", "4"), "B": workers("B", "--max-batch", "4")}
    for p in procs.values():
        p.wait_ready()
    # three cameras = three keys, so frames spread over partitions (and so over both workers)
    cams = [Camera(broker, topics, frames=60, fps=10, camera=f"cam-{i}", seed=i) for i in range(3)]
    seen = collect(broker, topics, lambda t: len(t.scores) >= 24, 90).tally
    victim = max(seen.scores.values(), key=lambda s: s.decided_ns).worker  # one that is busy now
    survivor = next(n for n in procs if n != victim)
    procs[victim].signal(signal.SIGKILL)
    sent = lambda: set().union(*(c.sent for c in cams))  # noqa: E731
    reader = collect(broker, topics,
                     lambda t: all(c.done.is_set() for c in cams) and sent() <= t.accounted, 180)
    t = reader.tally
    assert procs[victim].proc.wait(5) == -signal.SIGKILL
    assert len(sent()) == 180
    assert not (sent() - t.accounted), "no frame lost"
    # at-least-once: only the batch the victim held uncommitted can be scored twice
    assert t.duplicates <= 4, t.duplicates
    assert not [s for s in t.scores.values() if s.worker not in procs]
    # the survivor scored frames of the victim's partitions after the kill
    victim_parts = {s.ref.partition for s in seen.scores.values() if s.worker == victim}
    assert any(s.worker == survivor and s.ref.partition in victim_parts for s in t.scores.values())
    assert procs[survivor].stop() == 0


def test_sigterm_drains_without_loss_or_duplicates(broker, topics, workers):
    w1 = workers("drain-1", "--max-batch", "4")
    w1.wait_ready()
    cam = Camera(broker, topics, frames=60, fps=15)
    collect(broker, topics, lambda t: len(t.scores) >= 10, 60)
    w1.signal(signal.SIGTERM)
    assert w1.proc.wait(30) == 0, w1.log.read_text()
    assert "SIGTERM received" in w1.log.read_text()
    cam.thread.join(30)
    w2 = workers("drain-2", "--max-batch", "4")
    reader = collect(broker, topics, lambda t: cam.sent <= t.accounted, 120)
    t = reader.tally
    assert set(t.scores) == cam.sent
    assert t.duplicates == 0, "a drained worker commits everything it scored"
    by = {s.worker for s in t.scores.values()}
    assert by == {"drain-1", "drain-2"}
    assert w2.stop() == 0


def test_bad_input_goes_to_dead_letter_and_worker_keeps_going(broker, topics, workers):
    w = workers("dl", "--max-frame-bytes", "300000", "--max-frame-pixels", "1000000")
    w.wait_ready()
    good = _jpeg(64, 48, 1)
    truncated = good[: len(good) // 2]
    png = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))[1].tobytes()
    huge_bytes = cv2.imencode(".png", np.random.default_rng(2).integers(
        0, 255, (400, 400, 3), dtype=np.uint8))[1].tobytes()
    assert len(huge_bytes) > 300000
    many_pixels = cv2.imencode(".jpg", np.zeros((1100, 1000, 3), np.uint8))[1].tobytes()

    def hdr(seq: int, w_: int = 64, h_: int = 48, enc: str = "jpeg", drop: str = "",
            override: dict | None = None) -> list:
        h = [(k, v) for k, v in frame_meta(seq, w_, h_, enc).headers() if k != drop]
        for k, v in (override or {}).items():
            h = [(kk, v.encode() if kk == k else vv) for kk, vv in h]
        return h

    cases = {
        1: ("truncated_image", truncated, hdr(1)),
        2: ("empty_payload", b"", hdr(2)),
        3: ("not_an_image", b"this is not a picture", hdr(3)),
        4: ("missing_header", good, hdr(4, drop="lw-camera")),
        5: ("bad_header", good, hdr(5, override={"lw-seq": "5"} | {"lw-width": "wide"})),
        6: ("unknown_schema", good, hdr(6, override={"lw-schema": "99"})),
        7: ("too_large", huge_bytes, hdr(7, 400, 400, "png")),
        8: ("too_many_pixels", many_pixels, hdr(8, 1000, 1100)),
        9: ("encoding_mismatch", png, hdr(9)),
        10: ("size_mismatch", good, hdr(10, 640, 480)),
    }
    records = [(good, hdr(100))]
    records += [(value, headers) for _, value, headers in cases.values()]
    records += [(good, hdr(101)), (b"\xff\xd8", [("garbage", b"\x00")])]
    send_raw(broker, topics.frames, records)
    reader = collect(broker, topics, lambda t: len(t.dead) >= len(cases) + 1 and len(t.scores) >= 2, 60)
    t = reader.tally
    got = {dl.seq: dl.reason for k, dl in t.dead.items() if k[0] == "cam-bad"}
    # a frame without a camera id (case 4) is identified by its source position instead
    assert got == {seq: reason for seq, (reason, _, _) in cases.items() if seq != 4}
    assert {dl.cause for dl in t.dead.values()} == {"bad_input"}
    headerless = [dl for k, dl in t.dead.items() if k[0] == "@"]
    assert sorted(dl.reason for dl in headerless) == ["missing_header", "missing_header"]
    assert all(dl.source.topic == topics.frames for dl in headerless)
    assert set(t.scores) == {("cam-bad", "100"), ("cam-bad", "101")}
    assert w.proc.poll() is None, "worker still running"
    assert w.stop() == 0


def test_dead_letter_keeps_original_bytes(broker, topics, workers):
    from kafka import KafkaConsumer

    w = workers("dl2")
    w.wait_ready()
    payload = b"\xff\xd8\xff\xe0 not really a jpeg " * 10
    headers = frame_meta(5, 10, 10).headers()
    send_raw(broker, topics.frames, [(payload, headers)])
    c = KafkaConsumer(topics.deadletter, bootstrap_servers=broker.bootstrap,
                      auto_offset_reset="earliest", consumer_timeout_ms=30000)
    rec = next(iter(c))
    c.close()
    assert rec.value == payload
    h = headers_dict(rec.headers)
    assert h[H_DL_REASON] == "not_an_image"
    assert {k: v for k, v in headers_dict(headers).items()} == {
        k: v for k, v in h.items() if not k.startswith("lw-dl-")}
    assert w.stop() == 0


@pytest.mark.parametrize("cls", [Score, Alert])
def test_outputs_are_versioned_json(cls):
    from linewatch.wire import WireError

    with pytest.raises(WireError) as e:
        cls.from_bytes(b'{"schema": 2}')
    assert e.value.reason == "unknown_schema"
